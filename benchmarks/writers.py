"""What a benchmark run leaves behind: JSON (the records, the evidence), Markdown, a PNG chart, and
on the terminal the tables and loop.verdict's one line per resolution.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.runner import rate
from fasttin.errors import UserError
from fasttin.fileio import write_atomic, write_json_atomic, write_with
from fasttin.loop import verdict


def _fmt(v, spec: str = ",.0f") -> str:
    return "" if v is None else f"{v:{spec}}"


# the ratio column: the first of these a record has (stages.add_ratios computes them)
RATIOS = (("vs_ffcv_raw", "{:.2f}x FFCV raw"), ("vs_model", "{:.2f}x of model-only"),
          ("vs_trainer", "{:.3f}x fasttin.train"), ("vs_classic", "{:.2f}x classic"))


def ratio(r: dict) -> str:
    return next((text.format(r[key]) for key, text in RATIOS if r.get(key)), "")


# (column title, the cell of a record); a run with the peers stage has their columns too
RUN_COLUMNS = (("stage", lambda r: r["stage"]), ("what", lambda r: r["name"]), ("res", lambda r: r["res"] or ""),
               ("batch", lambda r: r["batch_size"]), ("device", lambda r: r["device"]),
               ("img/s", lambda r: _fmt(r["img_per_s"])), ("MB/s", lambda r: _fmt(r.get("mb_per_s") or None)),
               ("ratio", ratio), ("note", lambda r: f"skipped: {r['skipped']}" if r.get("skipped") else ""))
PEER_COLUMNS = (("version", lambda r: r.get("version", "")), ("out", lambda r: r.get("dtype") or ""),
                ("kernel", lambda r: r.get("kernel", "")),
                ("MAE vs PIL bicubic (0-255)", lambda r: _fmt(r.get("mae_vs_pil"), ".2f")))


def markdown(out: dict) -> str:
    """A record file (runner.envelope) as the Markdown BENCHMARKS.md quotes: the command, the date,
    the machine and versions, then one row a record."""
    env = out["environment"]
    columns = RUN_COLUMNS + (PEER_COLUMNS if any(r["stage"] == "peers" for r in out["records"]) else ())
    lines = [f"Command: `{out['command']}`  ",
             f"Date: {env['date']}; machine: {env['cpu']} x{env['cores']}, GPU: {env['gpu'] or 'none'}; "
             f"torch {env['torch']}, torchvision {env['torchvision']}, DALI {env['dali']}, "
             f"pillow {env['pillow']} (simd: {env['pillow_simd']}), numpy {env.get('numpy')}, Python {env['python']}"
             + (f"; commit {env['commit']}" if env.get("commit") else ""), "",
             "| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in out["records"]]
    return "\n".join(lines) + "\n"


def write_plot(path: Path, out: dict) -> None:
    """Horizontal bars, log scale, one colour per stage; saved beside `path`, then renamed."""
    import matplotlib  # present: benchmarks.run checks it before any work
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    env = out["environment"]
    done = [r for r in out["records"] if r.get("img_per_s")]
    colors = {s: plt.cm.tab10(i) for i, s in enumerate(sorted({r["stage"] for r in done}))}
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(done) + 1.5))
    ax.barh(range(len(done)), [r["img_per_s"] for r in done], color=[colors[r["stage"]] for r in done])
    ax.set_yticks(range(len(done)), [f"{r['stage']}: {r['name']}" + (f" @{r['res']}" if r["res"] else "")
                                     for r in done], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("images per second (log scale)")
    ax.set_title(f"fasttin, {env['gpu'] or env['cpu'] + ' x' + str(env['cores'])}, {env['date']}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    try:
        write_with(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


WRITERS = (("json", write_json_atomic), ("markdown", lambda path, out: write_atomic(path, markdown(out).encode())),
           ("plot", write_plot))  # in this order


def write_outputs(paths: dict, out: dict) -> list[str]:
    """Each requested output in turn (JSON first); returns one line per output that failed."""
    failed = []
    for key, write in WRITERS:
        if paths.get(key):
            try:
                write(paths[key], out)
            except UserError as e:
                failed.append(str(e))
    return failed


def table(records: list[dict]):
    """The terminal's table: the Markdown's columns but the batch, the note and the peers' extras."""
    from rich.table import Table
    t = Table(title="fasttin benchmarks")
    columns = [(title, cell) for title, cell in RUN_COLUMNS if title not in ("batch", "note")]
    for title, _ in columns:
        t.add_column(title, justify="left" if title in ("stage", "what") else "right")
    for r in records:
        t.add_row(*(("skipped" if r.get("skipped") and title == "img/s" else str(cell(r))) for title, cell in columns))
    return t


def verdicts(records: list[dict]) -> list[str]:
    """loop.verdict for the fastest end-to-end backend at each resolution, from the shares of its
    timed steps (the trainer's StepClock), pointing at a faster loader when the records show one."""
    lines = []
    for res in sorted({r["res"] for r in records if r["res"]}):
        at = [r for r in records if r["res"] == res and r.get("img_per_s")]
        train = [r for r in at if r["stage"] == "train" and r.get("data_wait_share") is not None]
        if not train:
            continue
        best = max(train, key=lambda r: r["img_per_s"])
        loaders = {r["backend"]: r["img_per_s"] for r in at if r["stage"] == "loader"}
        faster = max(loaders, key=loaders.get, default=best["backend"])
        better = None if faster == best["backend"] else (
            f"the {faster} loader is faster here ({loaders[faster]:,.0f} img/s loader-only): try --backend {faster}")
        s = {k: best.get(f"{k}_share", 0.0) for k in ("data_wait", "compute")}
        lines.append(f"res {res}, {best['backend']}: " + verdict(s, backend=best["backend"], better_backend=better,
                                                                 faster=best.get("faster")))  # as measured there
    return lines


def summary(records: list[dict]) -> list:
    """The headline, built whole before any of it is printed: loader-only and end-to-end per
    backend against the step's model-only ceiling (none when only read, decode or peers ran),
    then the verdicts."""
    from rich.table import Table
    from rich.text import Text
    t = Table(title="summary (model: the recipe's step on a resident batch)")
    for c in ("res", "model img/s", "backend", "loader img/s", "loader/model", "train img/s", "train/model"):
        t.add_column(c, justify="right")
    for res in sorted({r["res"] for r in records if r["res"]}):
        at = [r for r in records if r["res"] == res]
        for backend in ("resident", "dali", "pil", "classic"):
            loader = rate(at, stage="classic" if backend == "classic" else "loader", backend=backend)
            train = next((r for r in at if r["stage"] == "train" and r["backend"] == backend), {})
            model = rate(at, stage="model", name=train.get("model"))
            if loader is None and not train.get("img_per_s"):
                continue
            share = lambda v: "" if v is None or not model else f"{v / model:.2f}"  # noqa: E731
            t.add_row(str(res), _fmt(model), backend, _fmt(loader), share(loader), _fmt(train.get("img_per_s")),
                      share(train.get("img_per_s")))
    return [t] * bool(t.row_count) + [Text(line) for line in verdicts(records)]  # Text: never read as markup
