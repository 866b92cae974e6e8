"""The output layer never renders host-supplied text as rich markup."""

from __future__ import annotations

from fabdeploy.basics.output import table


def test_markup_like_host_text_prints_verbatim(capsys) -> None:
    table("hotfix [bold]x[/bold]", ["host", "outcome"],
          [["web1", "FAILED: hook printed [/etc/app.conf] and [red]oops"], ["web2", None]])
    out = capsys.readouterr().out
    assert "[/etc/app.conf]" in out and "[red]oops" in out and "[bold]x[/bold]" in out
