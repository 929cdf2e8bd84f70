"""Progress in a pipe (stdout not a terminal): plain lines, one per step with elapsed and ETA, stages start/done."""

from teal_quant.progress import Progress, duration, show_progress


def test_plain_lines_on_stdout_when_it_is_not_a_terminal(capsys, monkeypatch):
    """In a pipe or a log: plain lines on stdout (stderr keeps only errors, so a failing run's stderr is one line)."""
    monkeypatch.delenv("TEAL_QUANT_QUIET", raising=False)
    with show_progress(), Progress() as progress:  # pytest's captured stdout is not a terminal
        assert progress.plain
        stage = progress.add_task("opening model", total=None)
        progress.update(stage, total=1, completed=1)
        layers = progress.add_task("compressing layers", total=3, plain="steps")
        inner = progress.add_task("layer 0: greedy allocation", total=0.5, plain=None)
        progress.update(inner, completed=0.25)
        for _ in range(3):
            progress.advance(layers)
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0] == "opening model ..."
    assert lines[1].startswith("opening model: done in ")
    assert lines[2] == "compressing layers: 0/3"
    assert [line.split(",")[0] for line in lines[3:]] == [f"compressing layers: {i}/3" for i in (1, 2, 3)]
    assert "ETA" in lines[3] and "ETA" in lines[4] and "ETA" not in lines[5] and "elapsed" in lines[5]
    assert not any("greedy" in line for line in lines) and len(lines) == 6


def test_quiet_prints_nothing(capsys, monkeypatch):
    monkeypatch.setenv("TEAL_QUANT_QUIET", "1")
    with show_progress(), Progress() as progress:
        progress.advance(progress.add_task("compressing layers", total=2, plain="steps"))
    monkeypatch.delenv("TEAL_QUANT_QUIET")
    with Progress() as progress:  # a library call outside show_progress(): nothing either
        progress.advance(progress.add_task("compressing layers", total=2, plain="steps"))
    assert capsys.readouterr() == ("", "")


def test_duration():
    assert [duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]


def test_run_summary_shows_the_dense_base_model_beside_each_level(capsys):
    from pathlib import Path

    from teal_quant.report import print_run_summary
    from teal_quant.workflow import RunSummary

    rows = [{"model": "dense m", "level": None, "perplexity": 20.0, "realized_sparsity": None, "tokens": 100, "seconds": 1},
            {"model": "teal-quant", "level": 0.0, "perplexity": 21.0, "realized_sparsity": 0.0, "tokens": 100, "seconds": 1},
            {"model": "teal-quant", "level": 0.4, "perplexity": 25.0, "realized_sparsity": 0.4, "tokens": 100, "seconds": 1}]
    summary = RunSummary(artifact=Path("a"), levels=[0.0, 0.4], default_level=0.4, calibration_sparsity=[0.0, 0.4],
                         block_error={"greedy": [0.0, 0.01]}, artifact_bytes=1, dense_bytes=2, eval_rows=rows)
    print_run_summary(summary)
    out = capsys.readouterr().out
    dense_line = next(line for line in out.splitlines() if "dense float" in line)
    assert "20.00" in dense_line
    assert "+5.0 %" in out and "+25.0 %" in out and "same 100 predicted tokens" in out
