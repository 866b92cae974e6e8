# Hosts come from CAP_HOSTS (comma-separated ssh_config names, e.g. web1,web2).
ENV.fetch("CAP_HOSTS").split(",").map(&:strip).reject(&:empty?).each do |h|
  server h, user: "root", roles: %w[app web]
end
