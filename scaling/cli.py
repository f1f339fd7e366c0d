"""The ``scaling`` command line: thin commands that validate, call one function and print.

Every command validates its input before Ray or MLflow start; bad input exits with status 2 and
a message naming the file, the field and what was expected.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Hyperparameter and scaling studies of contrastive pretraining.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: export to Parquet shards.")
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override: KEY=VALUE (flat hyperparameter or dotted spec path)")]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(spec_path: Path, overrides: list[str] | None):  # -> StudySpec
    from scaling.spec import SpecError, load_spec

    try:
        return load_spec(spec_path, overrides or [])
    except SpecError as exc:
        _fail(str(exc))


@app.command()
def validate(spec: Path, set_: SetOpt = None) -> None:
    """Print the resolved spec, the number of trials and the resources a trial needs; refuse what cannot run."""
    from scaling.spec import SpecError, dump_resolved
    from scaling.study import check_fits, local_cluster_resources, num_samples, trial_resources

    s = _load(spec, set_)
    try:
        concurrent = check_fits(s, local_cluster_resources())
    except SpecError as exc:
        _fail(f"{spec}: {exc.field}: {exc.reason}")
    out.print(dump_resolved(s), highlight=False, markup=False)
    need = trial_resources(s)
    out.print(f"trials: {num_samples(s)} ({s.search.trials} configurations x {s.search.repeats} repeats), "
              f"sampler {s.search.sampler}, scheduler {s.search.scheduler.kind}")
    out.print(f"searched: {', '.join(s.space.searched()) or 'nothing'}")
    out.print(f"per trial: {s.resources.workers_per_trial} workers, {need['CPU']:g} CPU, {need['GPU']:g} GPU; "
              f"{concurrent} trial(s) at once on this machine")
    out.print(f"objective: {s.search.mode} {s.search.metric} on the validation split")


@app.command()
def run(
    spec: Path,
    set_: SetOpt = None,
    storage: Annotated[Optional[Path], typer.Option(help="directory for study directories (default ./studies)")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: spec's, else sqlite:///mlflow.db)")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: start a local Ray)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and print the plan, start nothing")] = False,
    progress: Annotated[bool, typer.Option(help="live progress display")] = True,
    analyze: Annotated[bool, typer.Option(help="export the sensitivity report at the end")] = False,
) -> None:
    """Run a study: Optuna samples, Ray Tune schedules, Ray Train trains, MLflow records."""
    from scaling.spec import SpecError
    from scaling.study import StudyError, run_study

    s = _load(spec, set_)
    if dry_run:
        validate(spec, set_)
        return
    raw = spec.read_text()
    try:
        result = run_study(s, raw_spec=raw, storage=storage, tracking_uri=tracking_uri, address=address,
                           progress=progress and sys.stderr.isatty())
    except SpecError as exc:
        _fail(f"{spec if exc.file == '<spec>' else exc.file}: {exc.field}: {exc.reason}")
    except StudyError as exc:
        _fail(str(exc))
    _summary(result, s)
    if analyze:
        _analyze_study(result)


def _summary(result, spec) -> None:  # type: ignore[no-untyped-def]
    t = result.trials
    statuses = t.column("status").to_pylist() if t.num_rows else []
    out.print(f"[bold]study {spec.name}[/]: {len(statuses)} trials: {statuses.count('completed')} completed, "
              f"{statuses.count('pruned')} pruned, {statuses.count('failed')} failed")
    if result.best:
        b = result.best
        cfg = ", ".join(f"{k}={b[k]}" for k in spec.space.searched() if b.get(k) is not None)
        out.print(f"best {spec.search.metric} = {b[spec.search.metric]:.4f} ({b['trial_id']}: {cfg})")
        if spec.search.metric == "knn_top1":
            gain = 100 * (b["knn_top1"] - result.raw_pixel_knn)
            out.print(f"raw-pixel kNN top-1 = {result.raw_pixel_knn:.4f}: the best encoder is {gain:+.1f} points above raw pixels")
    out.print(f"study dir: {result.study_dir}")
    out.print(f"trial table: {result.study_dir / 'trials.parquet'}, curves: {result.study_dir / 'curves.parquet'}")
    out.print(f"MLflow experiment {spec.experiment} (parent run {result.parent_run_id}); browse with:")
    out.print(f"  {result.ui_hint}", highlight=False, markup=False)


def _analyze_study(result) -> None:  # type: ignore[no-untyped-def]
    from analysis.report import AnalysisError, analyze as run_analysis

    report_dir = result.study_dir / "report"
    try:
        run_analysis(trials=result.study_dir / "trials.parquet", out=report_dir, formats=("png", "svg", "pdf"),
                     tracking_uri=result.tracking_uri, parent_run_id=result.parent_run_id,
                     progress=lambda m: err.print(f"[dim]{m}[/]"))
    except AnalysisError as exc:
        err.print(f"[yellow]analysis skipped:[/] {exc}")
        return
    out.print(f"report: {report_dir / 'report.html'} (also in the parent run's artifacts under analysis/)")


@app.command()
def resume(
    study_dir: Path,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address")] = None,
    progress: Annotated[bool, typer.Option(help="live progress display")] = True,
) -> None:
    """Continue an interrupted study: finished trials are not re-run, MLflow runs are not duplicated."""
    from scaling.spec import SpecError
    from scaling.study import StudyError, resume_study

    try:
        result = resume_study(study_dir, address=address, progress=progress and sys.stderr.isatty())
    except (SpecError, StudyError) as exc:
        _fail(str(exc))
    from scaling.spec import load_spec

    _summary(result, load_spec(result.study_dir / "resolved.yaml"))


@app.command()
def train(
    spec: Path,
    set_: SetOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="override train.epochs")] = None,
) -> None:
    """Train one config (the spec's fixed values, no search) in this process, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    s = _load(spec, (set_ or []) + ([f"epochs={epochs}"] if epochs else []))
    import torch

    from scaling.loop import derived_params, load_data, raw_pixel_knn, train as train_loop

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = s.trial
    data = load_data(cfg)
    raw = raw_pixel_knn(data, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    d = derived_params(cfg, num_train=len(data.train), world_size=1)
    out.print(f"{cfg.data.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images; "
              f"loss {cfg.train.loss} t={cfg.train.temperature} batch {cfg.train.batch_size} views {cfg.train.views}; "
              f"lr {cfg.train.lr} -> scaled {d['scaled_lr']:.4g}")
    out.print(f"raw-pixel kNN top-1 (val): {raw:.4f}")
    with Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err) as bar:
        task = bar.add_task("train", total=cfg.train.epochs * d["steps_per_epoch"], epoch=1, info="")

        def on_step(epoch: int, step: int, steps: int) -> None:
            bar.update(task, advance=1, epoch=epoch)

        def on_epoch(m, ts) -> None:  # type: ignore[no-untyped-def]
            bar.update(task, info=f"loss {m.train_loss:.3f} kNN {m.knn_top1:.3f}")
            bar.console.print(f"epoch {m.epoch}: loss {m.train_loss:.4f}  val kNN {m.knn_top1:.4f}  "
                              f"test kNN {m.knn_top1_test or float('nan'):.4f}  {m.throughput:.0f} img/s  "
                              f"align {m.alignment:.3f} unif {m.uniformity:.3f} erank {m.effective_rank:.1f}")

        try:
            history = train_loop(cfg, data=data, on_step=on_step, on_epoch=on_epoch)
        except FloatingPointError as exc:
            _fail(str(exc), code=1)
    final = history[-1]
    out.print(f"[bold]val kNN top-1: encoder {final.knn_top1:.4f} vs raw pixels {raw:.4f} "
              f"({100 * (final.knn_top1 - raw):+.1f} points)[/]; test kNN {final.knn_top1_test or float('nan'):.4f}; "
              f"{final.wall_s:.0f} s training")


@app.command()
def analyze(
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment of the study")] = None,
    trials: Annotated[Optional[Path], typer.Option(help="trials.parquet of a study")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="output directory")] = Path("reports"),
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI")] = None,
    metric: Annotated[Optional[str], typer.Option(help="metric column (default: the study's)")] = None,
    format_: Annotated[str, typer.Option("--format", help="comma-separated: png,svg,pdf")] = "png,svg,pdf",
    delta: Annotated[float, typer.Option(help="tolerance in metric points (1.0 = 0.01 of a [0,1] metric)")] = 1.0,
) -> None:
    """Fit sensitivity curves and export plots + report (sensitivity.json, report.html)."""
    from analysis.report import AnalysisError, analyze as run_analysis

    if (experiment is None) == (trials is None):
        _fail("give exactly one of --experiment NAME or --trials FILE")
    formats = tuple(f.strip().lower() for f in format_.split(",") if f.strip())
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        _fail(f"--format: expected a comma-separated subset of png,svg,pdf, got {format_!r}")
    try:
        result = run_analysis(trials=trials, experiment=experiment, tracking_uri=tracking_uri, out=out_dir,
                              metric=metric, formats=formats, delta=delta,
                              progress=lambda m: err.print(f"[dim]{m}[/]"))
    except AnalysisError as exc:
        _fail(str(exc))
    n = len(result.get("curves", []))
    out.print(f"{n} sensitivity curves; report: {out_dir / 'report.html'}; data: {out_dir / 'sensitivity.json'}")


@data_app.command("export")
def data_export(
    name: str,
    out_dir: Annotated[Path, typer.Option("--out", help="output directory for Parquet shards")],
    root: Annotated[Optional[str], typer.Option(help="dataset root (cifar10/cifar100/stl10/imagefolder/parquet)")] = None,
    size: Annotated[Optional[int], typer.Option(help="number of images (generated datasets)")] = None,
    image_size: Annotated[int, typer.Option(help="resize to this resolution")] = 32,
    seed: Annotated[int, typer.Option(help="seed of generation and splits")] = 0,
    encoding: Annotated[str, typer.Option(help="png | jpeg | raw")] = "png",
) -> None:
    """Write any dataset as Parquet image shards (readable by every node of a cluster)."""
    from scaling.data import DATASET_NAMES, DataError, export_parquet, load_dataset

    if name not in DATASET_NAMES:
        _fail(f"dataset: expected one of {', '.join(DATASET_NAMES)}, got {name!r}")
    if encoding not in ("png", "jpeg", "raw"):
        _fail(f"--encoding: expected png, jpeg or raw, got {encoding!r}")
    try:
        splits = load_dataset(name, root=root, size=size, image_size=image_size, seed=seed)
        paths = export_parquet(splits, out_dir, encoding=encoding)
    except DataError as exc:
        _fail(str(exc))
    out.print(f"wrote {len(paths)} shards to {out_dir} ({len(splits.train)} train / {len(splits.val)} val / "
              f"{len(splits.test)} test)")


# ---------------------------------------------------------------------------------------------
# a Ray cluster, through the Ray Jobs API (scaling/cluster.py)

AddressOpt = Annotated[str, typer.Option("--address", envvar="RAY_ADDRESS",
                                         help="the head's Ray dashboard, e.g. http://HEAD:8265 (env RAY_ADDRESS)")]


@contextmanager
def _cluster_errors(spec: Path | None = None) -> Iterator[None]:
    """Bad input exits 2 (before the cluster is contacted); an unreachable or refusing cluster exits 1."""
    from scaling.cluster import ClusterError
    from scaling.spec import SpecError

    try:
        yield
    except SpecError as exc:  # --flags are not the spec's fields
        _fail(f"{exc.field}: {exc.reason}" if exc.field.startswith("--") else f"{spec or exc.file}: {exc.field}: {exc.reason}")
    except ValueError as exc:  # a malformed --address
        _fail(str(exc))
    except ClusterError as exc:
        _fail(str(exc), code=1)


def _follow(address: str, job_id: str) -> str:
    from scaling.cluster import follow

    try:
        with _cluster_errors():
            info = follow(address, job_id, lambda text: print(text, end="", flush=True))
    except KeyboardInterrupt:
        err.print(f"stopped following; the job keeps running (scaling stop {job_id} --address {address})",
                  highlight=False)
        raise typer.Exit(130) from None
    return info.status


@app.command()
def submit(
    spec: Path,
    address: AddressOpt,
    set_: SetOpt = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow server every node can reach, http(s)://HOST:5000")] = None,
    storage: Annotated[Optional[str], typer.Option(help="study directory root visible on every node "
                                                        "(default ./studies when the head is this machine)")] = None,
    python: Annotated[str, typer.Option(help="the job's interpreter on the head node")] = "python",
    wait: Annotated[bool, typer.Option("--wait", help="stream the job's logs until it ends; exit 1 unless it succeeded")] = False,
) -> None:
    """Submit a study to a Ray cluster as a Ray Job; prints the job id and how to follow it."""
    from scaling.cluster import submit as submit_job

    s = _load(spec, set_)
    with _cluster_errors(spec):
        job = submit_job(s, address=address, tracking_uri=tracking_uri, storage=storage, python=python)
    out.print(f"submitted study {s.name} as job [bold]{job.job_id}[/] to {job.address}")
    out.print(f"MLflow: {job.tracking_uri} (experiment {job.experiment}); study storage: {job.storage}")
    out.print(f"follow: scaling logs {job.job_id} --address {job.address} --follow   "
              f"(status: scaling status {job.job_id} --address {job.address}; "
              f"stop: scaling stop {job.job_id} --address {job.address})", highlight=False, soft_wrap=True)
    if wait:
        status = _follow(job.address, job.job_id)
        out.print(f"job {job.job_id}: {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def status(job_id: str, address: AddressOpt) -> None:
    """A submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and message."""
    from scaling.cluster import job_status

    with _cluster_errors():
        info = job_status(address, job_id)
    took = f", {info.duration_s:.0f} s" if info.duration_s is not None else ""
    out.print(f"{info.job_id}: {info.status}{took}" + (f" (study {info.study})" if info.study else ""))
    if info.message:
        out.print(info.message, highlight=False, markup=False)


@app.command()
def logs(
    job_id: str,
    address: AddressOpt,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="keep streaming until the job ends")] = False,
) -> None:
    """A submitted job's logs (the study's progress lines and summary)."""
    from scaling.cluster import job_logs

    if follow_:
        _follow(address, job_id)
        return
    with _cluster_errors():
        text = job_logs(address, job_id)
    print(text, end="")


@app.command()
def stop(job_id: str, address: AddressOpt) -> None:
    """Stop a running job: its trials stop and the study's parent run is closed as KILLED."""
    from scaling.cluster import stop_job

    with _cluster_errors():
        stopped = stop_job(address, job_id)
    out.print(f"{job_id}: {'stop requested' if stopped else 'not running (already ended)'}")


@app.command()
def jobs(address: AddressOpt) -> None:
    """The cluster's jobs, oldest first: one line each (job id, status, study, start, duration)."""
    from scaling.cluster import list_jobs

    with _cluster_errors():
        found = list_jobs(address)
    if not found:
        print("no jobs")
    width = max((len(j.job_id) for j in found), default=0)
    for j in found:  # plain lines, never wrapped: ids stay whole for copy and paste and for scripts
        started = j.start_time.strftime("%Y-%m-%d %H:%M:%S") if j.start_time else "-"
        took = f"{j.duration_s:.0f} s" if j.duration_s is not None else "-"
        print(f"{j.job_id:<{width}}  {j.status:<9}  {j.study or '-':<20}  {started}  {took}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
