"""The output layer never renders host-supplied text as rich markup."""

from __future__ import annotations

from fabdeploy.basics.output import table


def test_markup_like_host_text_prints_verbatim(capsys) -> None:
    table(
        "hotfix [bold]x[/bold]",
        ["host", "outcome"],
        [["web1", "FAILED: hook printed [/etc/app.conf] and [red]oops"], ["web2", None]],
    )
    out = capsys.readouterr().out
    assert "[/etc/app.conf]" in out and "[red]oops" in out and "[bold]x[/bold]" in out


def test_progress_line_per_host(capsys) -> None:
    import types

    from fabdeploy.basics.output import progress_line

    done = progress_line(0.0)
    done(types.SimpleNamespace(host="web1", ok=True, data={"changed": True}, error=None))
    done(types.SimpleNamespace(host="web2", ok=True, data={"changed": False}, error=None))
    done(types.SimpleNamespace(host="web3", ok=False, data={}, error="health check failed\nmore"))
    cfg_only = {"changed": False, "config_changed": ["config/database.yml"], "restarted": True}
    done(types.SimpleNamespace(host="web4", ok=True, data=cfg_only, error=None))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "web1: ok",
        "web2: unchanged",
        "web3: FAILED: health check failed",
        "web4: config changed",
    ]
