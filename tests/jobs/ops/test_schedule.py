"""``curate schedule``: the exact cron line, idempotent install, remove, systemd and k8s output."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import yaml

from jobs.cli.main import main
from jobs.errors import UserError
from jobs.ops import schedule

ADDRESS = "http://head:8265"
OTHER_LINE = "15 4 * * * /usr/local/bin/backup --all"


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "nightly-crawl.yaml"
    path.write_text(f"name: crawl\ninput:\n  url: {tmp_path}/in/dt={{date}}\n"
                    f"output:\n  url: {tmp_path}/out\nstages: []\n")
    return path


@pytest.fixture
def crontab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "crontab"
    path.write_text(OTHER_LINE + "\n")
    monkeypatch.setenv(schedule.CRONTAB_FILE_ENV, str(path))
    return path


def test_cron_line_is_exact():
    line = schedule.cron_line("nightly", "pipelines/nightly.yaml", "02:30", ADDRESS, "/srv/curate",
                              "/srv/curate/.venv/bin/curate")
    assert line == ("30 2 * * * cd /srv/curate && /srv/curate/.venv/bin/curate submit "
                    "pipelines/nightly.yaml --address http://head:8265 --date $(date -u +\\%F) "
                    "# curate:nightly")


def test_cron_line_quotes_paths_with_spaces():
    line = schedule.cron_line("p", "my pipes/p.yaml", "0:05", ADDRESS, "/srv/my curate", "curate")
    assert line.startswith("5 0 * * * cd '/srv/my curate' && curate submit 'my pipes/p.yaml' ")


@pytest.mark.parametrize("bad", ["24:00", "2:60", "0230", "2.30", ""])
def test_bad_time_is_refused(bad):
    with pytest.raises(UserError, match="HH:MM"):
        schedule.parse_at(bad)


def test_install_is_idempotent_and_remove_keeps_other_lines(pipeline, crontab, capsys):
    args = ["schedule", "install", "--pipeline", str(pipeline), "--at", "01:15", "--address", ADDRESS]
    assert main(args) == 0
    assert main(args) == 0
    assert "already installed" in capsys.readouterr().out
    lines = crontab.read_text().splitlines()
    expected = schedule.cron_line("crawl", str(pipeline.resolve()), "01:15", ADDRESS,
                                  str(schedule.PROJECT_ROOT), schedule.curate_command())
    assert lines == [OTHER_LINE, expected]

    assert main([*args[:-4], "--at", "03:45", "--address", ADDRESS]) == 0  # reschedule: replaced
    lines = crontab.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("45 3 * * * ")

    assert main(["schedule", "show"]) == 0
    assert capsys.readouterr().out.strip().endswith("# curate:crawl")

    assert main(["schedule", "remove", "--pipeline", "crawl"]) == 0
    assert crontab.read_text().splitlines() == [OTHER_LINE]
    assert main(["schedule", "remove", "--pipeline", "crawl"]) == 0
    assert "no schedule for crawl" in capsys.readouterr().out


def test_entries_are_per_pipeline():
    text = "\n".join([OTHER_LINE, "0 1 * * * x # curate:a", "0 2 * * * y # curate:ab"])
    assert schedule.entries(text) == ["0 1 * * * x # curate:a", "0 2 * * * y # curate:ab"]
    assert schedule.entries(text, "a") == ["0 1 * * * x # curate:a"]
    assert schedule.without(text, "a") == [OTHER_LINE, "0 2 * * * y # curate:ab"]


def test_install_needs_an_address(pipeline, crontab, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["schedule", "install", "--pipeline", str(pipeline)]) == 2
    assert "--address is required" in capsys.readouterr().err
    assert crontab.read_text() == OTHER_LINE + "\n"


def test_print_systemd(pipeline, crontab, capsys):
    assert main(["schedule", "install", "--pipeline", str(pipeline), "--at", "02:30",
                 "--address", ADDRESS, "--print", "systemd"]) == 0
    out = capsys.readouterr().out
    assert "OnCalendar=*-*-* 02:30:00 UTC" in out and "Persistent=true" in out
    exec_line = next(line for line in out.splitlines() if line.startswith("ExecStart="))
    # systemd needs %% and $$ for a literal % and $
    assert exec_line.startswith("ExecStart=/bin/sh -c ")
    assert "--date $$(date -u +%%F)" in shlex.split(exec_line.removeprefix("ExecStart="))[2]
    assert crontab.read_text() == OTHER_LINE + "\n"  # printing installs nothing


def test_print_k8s_cronjob(pipeline, crontab, capsys):
    assert main(["schedule", "install", "--pipeline", str(pipeline), "--at", "02:30",
                 "--address", ADDRESS, "--print", "k8s", "--image", "registry/curate:1"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["kind"] == "CronJob" and job["spec"]["schedule"] == "30 2 * * *"
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    container = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry/curate:1"
    assert container["command"][:2] == ["/bin/sh", "-c"]
    assert f"--address {ADDRESS} --date $(date -u +%F)" in container["command"][2]


def test_curate_command_uses_this_environment():
    assert schedule.curate_command().startswith(shlex.quote(str(Path(sys.executable).parent)))


def test_maintain_cron_line_is_exact():
    line = schedule.maintain_cron_line("nightly", "pipelines/nightly.yaml", "04:10", 7, "/srv/curate",
                                       "/srv/curate/.venv/bin/curate")
    assert line == ("10 4 * * * cd /srv/curate && /srv/curate/.venv/bin/curate maintain --pipeline "
                    "pipelines/nightly.yaml --retain-days 7 # curate:nightly.maintain")


def test_install_maintain_beside_the_nightly_submit(pipeline, crontab, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nightly = ["schedule", "install", "--pipeline", str(pipeline), "--at", "01:15", "--address", ADDRESS]
    upkeep = ["schedule", "install", "--maintain", "--pipeline", str(pipeline), "--at", "05:00",
              "--retain-days", "30"]
    assert main(nightly) == 0
    assert main(upkeep) == 0  # no --address needed
    assert main(upkeep) == 0
    assert "already installed" in capsys.readouterr().out
    lines = crontab.read_text().splitlines()
    expected = schedule.maintain_cron_line("crawl", str(pipeline.resolve()), "05:00", 30,
                                           str(schedule.PROJECT_ROOT), schedule.curate_command())
    assert lines[0] == OTHER_LINE and lines[1].endswith("# curate:crawl") and lines[2] == expected
    assert len(lines) == 3 and "maintain --pipeline" in expected and "--retain-days 30" in expected

    assert main(["schedule", "show", "--pipeline", str(pipeline)]) == 0
    assert capsys.readouterr().out.splitlines() == lines[1:]
    assert main(["schedule", "show", "--maintain"]) == 0
    assert capsys.readouterr().out.splitlines() == [expected]

    assert main(["schedule", "remove", "--maintain", "--pipeline", "crawl"]) == 0  # the upkeep only
    assert crontab.read_text().splitlines() == lines[:2]


def test_scheduled_maintain_command_runs(pipeline, crontab, tmp_path, capsys):
    """The installed line's command is a valid `curate maintain` (its output: the pipeline's)."""
    assert main(["schedule", "install", "--maintain", "--pipeline", str(pipeline)]) == 0
    line = crontab.read_text().splitlines()[-1]
    args = shlex.split(line.split(" && ", 1)[1].split(" # curate:")[0])
    assert args[args.index("maintain"):] == ["maintain", "--pipeline", str(pipeline.resolve()),
                                             "--retain-days", "14"]
    capsys.readouterr()
    assert main(args[args.index("maintain"):]) == 2  # nothing committed under the pipeline's output yet
    assert f"{tmp_path}/out" in capsys.readouterr().err


def test_print_maintain_systemd_and_k8s(pipeline, crontab, capsys):
    assert main(["schedule", "install", "--maintain", "--pipeline", str(pipeline), "--print", "systemd"]) == 0
    out = capsys.readouterr().out
    assert "curate-crawl.maintain.timer" in out and "maintain --pipeline" in out and "submit" not in out
    assert main(["schedule", "install", "--maintain", "--pipeline", str(pipeline), "--print", "k8s",
                 "--retain-days", "3"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    command = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert command.startswith("curate maintain --pipeline ") and command.endswith("--retain-days 3")
    assert job["metadata"]["name"] == "curate-crawl-maintain"
    assert crontab.read_text() == OTHER_LINE + "\n"
