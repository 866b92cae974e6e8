# The same layout fabdeploy uses (Capistrano 3's), in a different deploy_to so the two
# tools never touch each other's releases.
lock "~> 3.17"

set :application, ENV.fetch("CAP_APP", "capshop")
set :repo_url, ENV.fetch("CAP_REPO_URL")
set :branch, ENV.fetch("CAP_BRANCH", "main")
set :deploy_to, ENV.fetch("CAP_DEPLOY_TO", "/srv/capshop")
set :keep_releases, 5
append :linked_files, "config/database.yml"
append :linked_dirs, "log", "tmp/pids"

# Quiet, machine-friendly output (the bench only needs the exit code and the time).
set :format, ENV.fetch("CAP_FORMAT", "airbrussh").to_sym
set :log_level, :warn
set :pty, false

# The sandbox's ssh_config resolves webK -> 127.0.X.K, names the key and the known_hosts
# file (strict checking). net-ssh reads HostName/User/IdentityFile/IdentitiesOnly/
# UserKnownHostsFile/GlobalKnownHostsFile/StrictHostKeyChecking from it.
set :ssh_options, {
  config: ENV.fetch("CAP_SSH_CONFIG"),
  user: "root",
  keys: [ENV.fetch("CAP_SSH_KEY")],
  keys_only: true,
  user_known_hosts_file: ENV.fetch("CAP_KNOWN_HOSTS"),
  global_known_hosts_file: "/dev/null",
  verify_host_key: :always,
  non_interactive: true,
  timeout: 10,
  # net-ssh needs the x25519 gem (not packaged in Debian) for curve25519; the bench adds
  # ecdh-sha2-nistp256 to the sandbox sshd (a cheap kex too).
  kex: %w[ecdh-sha2-nistp256],
}

# Restart, for a like-for-like comparison with `fab deploy.hotfix` (which restarts the app
# after swapping `current`): CAP_RESTART is run on every host after publishing.
# Empty = no restart (Capistrano's default).
namespace :deploy do
  task :restart_app do
    cmd = ENV.fetch("CAP_RESTART", "")
    next if cmd.empty?
    on roles(:app) do
      execute cmd
    end
  end
  after :publishing, :restart_app
end
