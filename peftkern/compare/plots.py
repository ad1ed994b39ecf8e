"""The comparison as PNG plots, from the JSON document `peftkern compare` writes:
- compare.png: test accuracy against trainable share (log x), and time per step, at the
  largest training set;
- accuracy-vs-size.png (with more than one size): test accuracy (mean ± std over seeds)
  against the training-set size (log x), one line per method;
- loss-curves.png: per method, the training and validation loss per epoch of the first seed at
  the chosen learning rate, one colour per size, the best epoch circled and an early stop
  crossed.
Nothing is written when matplotlib is not installed."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def write_plots(document: dict, out: Path) -> list[Path]:
    """The files written (none without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    sizes = sorted({r["train_size"] for r in document["results"]})
    files = [_overview(plt, document, sizes[-1], out / "compare.png")]
    if len(sizes) > 1:
        files.append(_accuracy_vs_size(plt, document, out / "accuracy-vs-size.png"))
    files.append(_loss_curves(plt, document, out / "loss-curves.png"))
    return files


def _save(plt, fig, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _overview(plt, document: dict, size: int, path: Path) -> Path:
    records = [r for r in document["results"] if r["train_size"] == size]
    fig, (acc, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in records:
        acc.errorbar(r["share"], r["test_acc_mean"], yerr=r["test_acc_std"], fmt="o", capsize=3)
        acc.annotate(r["method"], (r["share"], r["test_acc_mean"]), textcoords="offset points", xytext=(5, 4))
    acc.set_xscale("log")
    acc.set_ylim(0.0, 1.0)
    acc.set_xlabel("trainable parameters (% of the model)")
    acc.set_ylabel(f"test accuracy (n={size})")
    acc.grid(alpha=0.3)
    speed.bar([r["method"] for r in records], [r["ms_per_step"] for r in records])
    speed.set_ylabel("ms per training step (median)")
    speed.tick_params(axis="x", labelrotation=30)
    speed.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path, f"{document['model_name']} on {document['task']}")


def _accuracy_vs_size(plt, document: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = dict.fromkeys(r["method"] for r in document["results"])
    for method in methods:
        records = sorted(
            (r for r in document["results"] if r["method"] == method), key=lambda r: r["train_size"]
        )
        ax.errorbar(
            [r["train_size"] for r in records],
            [r["test_acc_mean"] for r in records],
            yerr=[r["test_acc_std"] for r in records],
            marker="o",
            capsize=3,
            label=method,
        )
    ax.set_xscale("log")
    sizes = sorted({r["train_size"] for r in document["results"]})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training examples")
    ax.set_ylabel(f"test accuracy (mean ± std of {document['config']['seeds']} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(plt, fig, path, "adaptation: accuracy against training-set size")


def _loss_curves(plt, document: dict, path: Path) -> Path:
    results = document["results"]
    methods = list(dict.fromkeys(r["method"] for r in results))
    columns = min(4, len(methods))
    rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, method in zip(axes.flat, methods):
        for i, record in enumerate(r for r in results if r["method"] == method):
            # The first seed's run at the chosen learning rate: the record's first run.
            run = next(
                r
                for r in document["runs"]
                if r["method"] == method
                and r["train_size"] == record["train_size"]
                and r["lr"] == record["lr"]
            )
            curve, colour = run["curve"], colours[i % len(colours)]
            epochs = range(1, len(curve["val_loss"]) + 1)
            ax.plot(epochs, curve["train_loss"], "--", color=colour, alpha=0.7)
            ax.plot(epochs, curve["val_loss"], "-", color=colour, label=f"n={record['train_size']}")
            best = run["best_epoch"]
            if best:
                ax.plot(best, curve["val_loss"][best - 1], "o", color=colour, mfc="none", ms=9)
            if run["stopped_early"]:
                ax.plot(len(epochs), curve["val_loss"][-1], "x", color=colour, ms=9, mew=2)
        ax.set_title(method)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("loss (val solid, train dashed)")
    axes.flat[0].legend(fontsize="small")
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    return _save(plt, fig, path, "loss per epoch: best epoch circled, early stop crossed")
