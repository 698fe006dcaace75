"""Stage order (in one place), fingerprints and reuse, the parent MLflow run, and one nested run per stage.

``run_pipeline`` runs a recipe's stages (``stages_for``: the built-in families train and export, a
``family: onnx`` recipe imports an existing file) in ``STAGES`` order inside one parent run;
``run_stage`` runs a single stage in a run of its own (what `pipeline train`, `pipeline export`, ... do).
Either way a stage gets its own config section, the run directory and a Tracker, and returns a Result
with a one-line summary.
Each stage goes: decide (reuse or run) -> run -> stamp. The bookkeeping in MLflow is a Recorder's
(pipeline/tracking.py): ``MlflowRecorder``, or ``NullRecorder`` for ``--no-track`` and for torchrun's
secondary ranks, which record nothing; this module never asks whether it is tracking.

Reuse. ``IO`` says, per stage, which recipe sections, run-directory files and code it reads and which
files it writes. From it a stage's fingerprint is computed (pipeline/fingerprint.py). After a stage
finishes, a stamp ``results/<stage>.json`` records its fingerprint, the sha256 of every file it wrote
(the declared ones plus any other file that appeared or changed while it ran, so new artifacts are
covered without editing the table) and its MLflow run id; the same fingerprint and output hashes go
on the stage's MLflow run as tags. A later run reuses the stage when the fingerprint is the same AND
every recorded output is still present with its recorded hash; otherwise it reruns and says why.

Precedence: the run directory's stamp decides, because it sits beside the files it vouches for and
works with ``--no-track``. The store is asked only when the stamp is missing or stale: a FINISHED run
of the stage with the same fingerprint whose recorded outputs are all present here with the same
hashes is reused (and a fresh stamp written). A store never overrides a stamp.

Safety. A pipeline holds an exclusive ``flock`` on ``<rundir>/.pipeline.lock``; a second pipeline on
the same directory is refused with a message naming the holder. ``pipeline.json`` records the
running pipeline (recipe, stages, MLflow run ids). SIGTERM and Ctrl-C end the MLflow runs as KILLED.
After a SIGKILL nothing can run, so the next pipeline on the directory detects it: the lock is free
(the kernel drops an flock when its holder dies) yet ``pipeline.json`` still says "running"; the
runs it names, and any other RUNNING run tagged with this directory and host, are marked KILLED, and
a registered version a killed register left unfinished is deleted (``MlflowRecorder.recover``). Any
pipeline or stage command holding the lock also removes the temporary files killed writers left
(``remove_stale_temporaries``). A file a stage cannot use (``BadFile``: truncated, corrupt) is one
error naming the stage that rewrites it.
``--resume`` reruns the recorded recipe; finished stages are reused through their stamps, so it
continues at the first unfinished stage, in a new parent run tagged ``pipeline.resumes``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

import models
from pipeline import fingerprint as fp
from pipeline import tracking
from pipeline.config import IMPORTED, Recipe, recipe_from_dict
from pipeline.tracking import Recorder
from stages.contract import RunDir
from stages import benchmark, distributed, evaluate, export, import_onnx, prepare, quantize, register, train
from stages.common import (BadFile, InputError, StageError, scratch_dir, sha256_file, stale_scratch_dirs,
                           stale_temporaries, write_json, write_text)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    recipe: Recipe
    rundir: RunDir
    device: str | None = None  # train --device override
    pipeline_run_id: str | None = None
    resume: bool = False  # train --resume: continue from the run directory's train_state.pt
    init_from: str | None = None  # train --init-from: a checkpoint path or an MLflow run id


def resolve_checkpoint(ref: str, option: str, *, recipe_names: bool = False,
                       scratch: contextlib.ExitStack | None = None) -> Path:
    """A checkpoint reference as a local file: a path, an MLflow run id (downloaded from the store),
    or (``recipe_names``) a recipe name whose run directory holds it (runs/<name>/checkpoint.pt).

    A download goes to a scratch folder (``onnx-pipeline-ckpt-<pid>-*``) removed when ``scratch``
    closes, or when the process exits if there is none; one a killed process left behind is removed by
    the next pipeline (``remove_stale_temporaries``)."""
    path = Path(ref)
    if path.is_file():
        return path
    if tracking.looks_like_run_id(ref):
        folder = scratch_dir("ckpt")
        if scratch is not None:
            scratch.callback(shutil.rmtree, folder, ignore_errors=True)
        else:
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
        try:
            return tracking.download_checkpoint(ref, folder)
        except StageError as e:  # the same error, saying which option named the run
            raise StageError(f"{option}: {e}") from None
    if recipe_names and "/" not in ref and not Path(ref).suffix:  # a recipe name has no suffix; a file does
        made = Path("runs") / ref / "checkpoint.pt"
        if made.is_file():
            return made
        raise StageError(f"{option} `{ref}` has no checkpoint at {made}: train it first with "
                         f"`pipeline run --recipe configs/{ref}.yaml` (`make all` trains digits-cnn), "
                         "or give a checkpoint path or an MLflow run id")
    raise StageError(f"{option} `{ref}` is neither a checkpoint file nor an MLflow run id (32 hex digits)"
                     f"{' nor a recipe name with runs/<name>/checkpoint.pt' if recipe_names else ''}")


def _weights_ref(c: Context) -> tuple[str, str] | None:
    """(reference, who named it) of the weights train starts from: --init-from or train.finetune.weights."""
    recipe_weights = c.recipe.train.finetune.weights
    if c.init_from and recipe_weights:
        raise InputError(f"--init-from {c.init_from} and train.finetune.weights {recipe_weights} both name weights "
                         "to start from; pass one (`--set train.finetune.weights=` clears the recipe's)")
    if c.init_from:
        return c.init_from, "--init-from"
    return (recipe_weights, "train.finetune.weights") if recipe_weights else None


def _train(c: Context, t) -> train.Result:
    teacher = c.recipe.train.distill.teacher
    if c.resume and c.init_from:
        raise InputError("--resume and --init-from exclude each other: a resumed run already has its weights")
    weights = _weights_ref(c)
    with contextlib.ExitStack() as scratch:  # downloaded checkpoints go when the stage ends
        try:
            init_from = resolve_checkpoint(*weights, recipe_names=True, scratch=scratch) if weights else None
        except StageError as e:  # a weights file that is not there: the recipe or the option must change
            raise InputError(str(e)) from None
        return train.run(c.recipe.train, c.rundir, t, family=c.recipe.model.family, model_config=c.recipe.model.config,
                         recipe=c.recipe.to_dict(), device=c.device, resume=c.resume, init_from=init_from,
                         teacher=resolve_checkpoint(teacher, "train.distill.teacher", recipe_names=True,
                                                    scratch=scratch) if teacher else None)


def _train_weights_file(c: Context) -> dict[str, Path]:
    """The local file train starts from, for its fingerprint: retraining the run it names reruns this
    one. A run id names immutable artifacts, so its id (an option or recipe value) is enough."""
    ref = _weights_ref(c)
    if ref is None:
        return {}
    path = Path(ref[0])
    if not path.is_file() and "/" not in ref[0] and not path.suffix:
        path = Path("runs") / ref[0] / "checkpoint.pt"  # a recipe name (resolve_checkpoint's rule)
    return {f"{ref[1]} {ref[0]}": path} if path.is_file() else {}


RUNNERS: dict[str, Callable[[Context, Any], Any]] = {
    "prepare": lambda c, t: prepare.run(c.recipe.prepare, c.rundir, t),
    "train": _train,
    "evaluate": lambda c, t: evaluate.run(c.recipe.evaluate, c.rundir, t),
    "export": lambda c, t: export.run(c.recipe.export, c.rundir, t),
    "import": lambda c, t: import_onnx.run(c.recipe.model.config, c.rundir, t),
    "quantize": lambda c, t: quantize.run(c.recipe.quantize, c.rundir, t),
    "benchmark": lambda c, t: benchmark.run(c.recipe.benchmark, c.rundir, t),
    "register": lambda c, t: register.run(c.recipe.register, c.rundir, t, recipe_name=c.recipe.name,
                                          pipeline_run_id=c.pipeline_run_id,
                                          serving=c.recipe.serve.runtime.session_settings(),
                                          max_batch_size=c.recipe.serve.batching.max_batch_size),
}
STAGES: tuple[str, ...] = tuple(RUNNERS)
# Which stages a recipe runs, by where its model comes from: trained and exported here (the built-in
# families), or an existing .onnx file imported (family onnx; without data it is imported only).
BUILT_IN_STAGES = tuple(s for s in STAGES if s != "import")
IMPORT_STAGES = ("prepare", "import", "quantize", "benchmark", "register")


def stages_for(recipe: Recipe) -> tuple[str, ...]:
    """The stages `pipeline run` runs for ``recipe``, in order."""
    if recipe.model.family == IMPORTED:
        return IMPORT_STAGES if recipe.prepare.dataset != "none" else ("import",)
    return BUILT_IN_STAGES


@dataclass(frozen=True)
class StageIO:
    """What a stage depends on and produces: the one table reuse, --explain and lineage go by.

    ``sections``: recipe sections it reads ("name" is the recipe's name; "serve.runtime" a part of one).
    ``external``: recipe keys naming files outside the run directory whose content it reads (import's
    ``model.path``): their sha256 is part of the fingerprint, so editing the file reruns the stage.
    ``reads`` / ``writes``: RunDir attribute names (a Path, or a list of Paths). ``modules``: its code (project modules it
    imports are followed). ``options``: Context fields that change its result. ``models``: written
    files logged as MLflow LoggedModels; ``evaluates``: read models its metrics are linked to.
    """

    sections: tuple[str, ...]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    modules: tuple[str, ...]
    options: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    evaluates: tuple[str, ...] = ()
    registers: bool = False  # writes to the model registry: the store is part of its fingerprint
    # Files outside the run directory it reads (weights to start from), by the name --explain shows.
    outside_files: Callable[[Context], dict[str, Path]] | None = None
    user_code: bool = False  # runs the user's code (a custom model's factory): its source is part of the fingerprint
    system_metrics: bool = False  # record CPU / memory / GPU while it runs
    dataset_context: str = ""  # log the run directory's dataset as an MLflow input in this context
    external: tuple[str, ...] = ()


IO: dict[str, StageIO] = {
    "prepare": StageIO(("prepare",), (), ("data", "dataset"), ("stages.prepare",), external=("prepare.path",)),
    "train": StageIO(("train", "model"), ("data", "dataset"),
                     ("checkpoint", "checkpoint_json", "history", "training_curves", "weights_report"), ("stages.train",),
                     options=("device", "init_from", "resume"), models=("checkpoint",), system_metrics=True, dataset_context="training",
                     outside_files=_train_weights_file, user_code=True),
    "evaluate": StageIO(("evaluate",), ("data", "dataset", "checkpoint"), ("metrics", "confusion_matrix"),
                        ("stages.evaluate",), evaluates=("checkpoint",), dataset_context="evaluation"),
    "export": StageIO(("export",), ("checkpoint", "data", "dataset", "metrics"), ("onnx", "export_report"),
                      ("stages.export",), models=("onnx",)),
    "import": StageIO(("model",), (), ("onnx", "import_report"), ("stages.import_onnx",), models=("onnx",),
                      external=("model.path",)),
    "quantize": StageIO(("quantize",), ("onnx", "data", "dataset"), ("variants", "quantized_variants"),
                        ("stages.quantize",), models=("quantized_variants",), evaluates=("onnx",),
                        dataset_context="calibration-and-evaluation"),
    "benchmark": StageIO(("benchmark",), ("variants", "onnx", "quantized_variants", "checkpoint", "data", "dataset"),
                         ("benchmark_json", "benchmark_md"), ("stages.benchmark",), dataset_context="benchmark"),
    "register": StageIO(("register", "name", "serve.runtime", "serve.batching.max_batch_size"),
                        ("variants", "benchmark_json", "onnx", "quantized_variants", "data", "dataset",
                         "checkpoint_json", "export_report", "import_report"),
                        ("registration",), ("stages.register",), registers=True),
}
if set(IO) != set(RUNNERS):  # reuse, --explain and the MLflow record all go by a stage's IO entry
    raise RuntimeError(f"stages {sorted(set(IO) ^ set(RUNNERS))} need both a runner and an IO entry")
# Context fields every stage may see; any other (added later) makes a stage rerun unless IO names it.
_KNOWN_CONTEXT = {"recipe", "rundir", "pipeline_run_id", "device"}
ALL = "all"


@dataclass
class Outcome:
    stage: str
    status: str  # done | reused | failed | killed | skipped
    seconds: float = 0.0
    summary: str = ""
    run_id: str | None = None
    reason: str = ""


class PipelineFailed(RuntimeError):
    def __init__(self, outcomes: list[Outcome], error: BaseException):
        super().__init__(str(error))
        self.outcomes, self.error = outcomes, error


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so every open MLflow run ends KILLED on the way out."""


def secondary_rank() -> bool:
    """Under torchrun, ranks other than 0 neither track, lock, nor write stamps (rank 0 does)."""
    return int(os.environ.get("RANK", "0") or 0) != 0


def default_rundir(recipe: Recipe) -> RunDir:
    return RunDir(Path("runs") / recipe.name)


def _write_recipe(recipe: Recipe, rundir: RunDir) -> Path:
    return write_text(rundir.recipe, yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _recorder(track: bool, rundir: RunDir, experiment: str | None = None) -> Recorder:
    """The run's bookkeeping: in the MLflow store, or none (`--no-track`, and torchrun's ranks other
    than 0, which record nothing)."""
    return tracking.MlflowRecorder(rundir, experiment) if track and not secondary_rank() else tracking.NullRecorder()


# ---------------------------------------------------------------- files a stage reads and writes

def _paths(rundir: RunDir, names: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for name in names:
        value = getattr(rundir, name)
        out.extend(value if isinstance(value, (list, tuple)) else [value])
    return out


def _rel(rundir: RunDir, path: Path) -> str:
    return Path(path).relative_to(rundir.root).as_posix()


def _snapshot(rundir: RunDir) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every artifact file, to find what a stage wrote beyond its declared outputs."""
    snap = {}
    for path in rundir.root.rglob("*"):
        rel = _rel(rundir, path)
        if (path.is_file() and rel.split("/")[0] not in RunDir.BOOKKEEPING
                and not any(part.startswith(".") for part in rel.split("/"))):
            st = path.stat()
            snap[rel] = (st.st_mtime_ns, st.st_size)
    return snap


def _section(plain: dict, dotted: str) -> Any:
    """A recipe section or a part of one (``serve.runtime``): a stage that reads only part of a section
    is not rerun when another part changes (register measures with the server's runtime settings; a
    new port must not register a new version)."""
    node: Any = plain
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def compute_fingerprint(stage: str, ctx: Context, store: str | None) -> fp.Fingerprint:
    """``store``: the tracking URI the run records in (None: not recorded), part of a registering stage's inputs."""
    io = IO[stage]
    plain = ctx.recipe.to_dict()
    sections = {s: _section(plain, s) for s in io.sections}
    options = {o: getattr(ctx, o, None) for o in io.options}
    if io.registers:
        options["store"] = store or "none"
    files = {_rel(ctx.rundir, p): p for p in _paths(ctx.rundir, io.reads)}
    for key in io.external:  # "upstream file model.path changed" when the file's content does
        if _section(plain, key):
            files[key] = Path(_section(plain, key))
    if io.outside_files is not None:
        files.update(io.outside_files(ctx))
    user = models.code_modules(ctx.recipe.model.family, ctx.recipe.model.config) if io.user_code else ()
    return fp.compute(sections=sections, options=options, files=files, modules=io.modules, user_modules=user)


# ---------------------------------------------------------------- stamps and the reuse decision

def read_stamp(rundir: RunDir, stage: str) -> dict | None:
    try:
        stamp = json.loads(rundir.result(stage).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("fingerprint") else None


def _outputs_intact(rundir: RunDir, outputs: dict[str, str]) -> str | None:
    """None when every recorded output is present with its recorded sha256, else what is wrong."""
    for rel, digest in outputs.items():
        path = rundir.root / rel
        if not path.is_file():
            return f"output {rel} is missing"
        if sha256_file(path) != digest:
            return f"output {rel} changed since it was written"
    return None


@dataclass
class Decision:
    stage: str
    run: bool
    reasons: list[str]
    fingerprint: fp.Fingerprint
    reuse_run_id: str | None = None
    reuse_stamp: dict | None = None


def decide(stage: str, ctx: Context, recorder: Recorder, *, force: Iterable[str] = (),
           upstream_reruns: Iterable[str] = ()) -> Decision:
    """Would ``stage`` run, and why? ``upstream_reruns``: stages planned to rerun before it (--explain)."""
    print_ = compute_fingerprint(stage, ctx, recorder.store)
    force = set(force)
    if ALL in force or stage in force:
        return Decision(stage, True, ["forced by --force"], print_)
    io = IO[stage]
    unknown = sorted(f.name for f in dataclasses.fields(ctx) if f.name not in _KNOWN_CONTEXT | set(io.options)
                     and getattr(ctx, f.name) not in (None, False, (), ""))
    if unknown:
        return Decision(stage, True, [f"option {', '.join(unknown)} given"], print_)
    reads = {_rel(ctx.rundir, p) for p in _paths(ctx.rundir, io.reads)}
    upstream = [s for s in upstream_reruns if reads & _declared_outputs(ctx.rundir, s)]
    stamp = read_stamp(ctx.rundir, stage)
    if upstream:
        return Decision(stage, True, [f"upstream stage {s} reruns" for s in upstream], print_)
    if stamp is not None and stamp["fingerprint"] == print_.digest:
        problem = _outputs_intact(ctx.rundir, stamp.get("outputs", {}))
        if problem is None and io.registers:
            problem = recorder.registration_missing(stamp.get("result", {}))
        if problem is None:
            return Decision(stage, False, [f"unchanged since run {stamp.get('run_id') or '(untracked)'}"], print_,
                            stamp.get("run_id"), stamp)
        return Decision(stage, True, [problem], print_)
    found = _reusable_from_store(ctx, stage, print_, recorder)
    if found is not None:
        return Decision(stage, False, [f"unchanged since run {found['run_id']} (found in the MLflow store)"], print_,
                        found["run_id"], found)
    previous = _previous_components(ctx.rundir, stage)
    reasons = fp.explain(previous, print_.components)
    if stamp is None and previous is not None:  # a superseded stamp: the stage started and never finished
        reasons = ["its last run here did not finish"] + ([] if reasons == ["fingerprint differs"] else reasons)
    return Decision(stage, True, reasons, print_)


def _registration(rundir: RunDir) -> dict:
    """registration.json (name, version, aliases of what register registered); {} when unreadable."""
    try:
        return json.loads(rundir.registration.read_text())
    except (OSError, ValueError):
        return {}


def _declared_outputs(rundir: RunDir, stage: str) -> set[str]:
    names = {_rel(rundir, p) for p in _paths(rundir, IO[stage].writes)}
    stamp = read_stamp(rundir, stage)
    return names | set((stamp or {}).get("outputs", {}))


def _reusable_from_store(ctx: Context, stage: str, print_: fp.Fingerprint, recorder: Recorder) -> dict | None:
    for run_id, outputs, summary in recorder.earlier_runs(stage, print_.digest):
        if outputs and _outputs_intact(ctx.rundir, outputs) is None:
            if IO[stage].registers and recorder.registration_missing(_registration(ctx.rundir)) is not None:
                continue  # its version or an alias it set is gone (a killed registration was cleaned up)
            return {"stage": stage, "run_id": run_id, "fingerprint": print_.digest, "components": print_.components,
                    "outputs": outputs, "summary": summary, "result": {}, "seconds": 0.0, "reused_from_store": True}
    return None


def plan(recipe: Recipe, rundir: RunDir | None = None, stages: tuple[str, ...] | None = None, track: bool = True,
         device: str | None = None, force: Iterable[str] = (), init_from: str | None = None) -> list[Decision]:
    """What `pipeline run` would do, per stage, without running anything (``--explain``). ``stages``:
    default the recipe's (``stages_for``)."""
    stages = stages_for(recipe) if stages is None else stages
    rundir = rundir or default_rundir(recipe)
    ctx = Context(recipe, rundir, device, init_from=init_from)
    recorder = _recorder(track, rundir, recipe.name)
    decisions: list[Decision] = []
    for stage in _check_stages(stages):
        decisions.append(decide(stage, ctx, recorder, force=force, upstream_reruns=[x.stage for x in decisions if x.run]))
    return decisions


def _check_stages(stages: Iterable[str]) -> list[str]:
    stages = list(stages)
    unknown = [s for s in stages if s not in RUNNERS]
    if unknown:
        raise StageError(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
    return stages


# ---------------------------------------------------------------- the run directory lock and state

@contextlib.contextmanager
def locked(rundir: RunDir) -> Iterator[None]:
    """Hold the run directory for this process, or refuse with who holds it."""
    import fcntl

    rundir.ensure()
    if secondary_rank():
        yield
        return
    fd = os.open(rundir.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise StageError(f"run directory {rundir.root} is in use by another pipeline ({holder}); wait for it "
                             "to finish, or pass --workdir DIR to run in another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def read_state(rundir: RunDir) -> dict | None:
    try:
        return json.loads(rundir.state.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def remove_stale_temporaries(rundir: RunDir) -> list[Path]:
    """Call with the lock held. Remove what killed writers left: the run directory's atomic-write
    temporaries (``.<file>.<pid>.<random>.tmp``) and this program's scratch folders in the temporary
    directory (``onnx-pipeline-<kind>-<pid>-*``: checkpoint downloads, quantize's work), each only when
    the process named in it is dead. Returns what was removed."""
    removed = []
    for path in stale_temporaries(rundir.root):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    for folder in stale_scratch_dirs():
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    if removed:
        log.warning("removed %d temporary file(s) left by killed runs: %s", len(removed),
                    ", ".join(p.name for p in removed[:5]) + (", ..." if len(removed) > 5 else ""))
    return removed


def recover_stale(rundir: RunDir, recorder: Recorder) -> list[str]:
    """Call with the lock held. A state still "running" means its process died without cleaning up
    (SIGKILL, power loss): mark it killed, and its RUNNING MLflow runs KILLED; the recorder also removes
    what a killed register left half-done in the registry. Temporaries of killed writers are removed.
    Returns the run ids marked."""
    if secondary_rank():
        return []
    remove_stale_temporaries(rundir)
    state = read_state(rundir)
    stale = state if state is not None and state.get("status") == "running" else None
    if stale is not None:
        log.warning("the pipeline run of %s (pid %s, started %s) died without finishing; marking it killed",
                    rundir.root, stale.get("pid"), stale.get("started"))
        write_json(rundir.state, {**stale, "status": "killed", "ended": _now(),
                                  "note": "found dead by a later run: lock free while running"})
    return recorder.recover(stale)


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGTERM raises Terminated (a KeyboardInterrupt) so runs end KILLED; Ctrl-C already raises one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _State:
    """pipeline.json, rewritten atomically as the pipeline goes."""

    def __init__(self, rundir: RunDir, **fields: Any):
        self.rundir = rundir
        self.data = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                     "stage_runs": {}, "current_stage": None, **fields}
        self.save()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def stage_run(self, stage: str, run_id: str | None) -> None:
        if run_id:
            self.data["stage_runs"][stage] = run_id
        self.update(current_stage=stage)

    def save(self) -> None:
        if not secondary_rank():
            write_json(self.rundir.state, self.data)


# ---------------------------------------------------------------- running

def _execute(stage: str, ctx: Context, tracker, decision: Decision, recorder: Recorder) -> Outcome:
    """Run a stage, then stamp it: results/<stage>.json and, through the recorder, its run."""
    log.info("▶ %s (%s)", stage, "; ".join(decision.reasons))
    _supersede_stamp(ctx.rundir, stage)  # a stage killed mid-way leaves no stamp to reuse
    before = _snapshot(ctx.rundir)
    t0 = time.perf_counter()
    try:
        result = RUNNERS[stage](ctx, tracker)
    except BadFile as e:
        raise _writer_fix(e, ctx.rundir) from None
    seconds = time.perf_counter() - t0
    if not distributed.is_main():  # under torchrun only rank 0 records and writes files
        return Outcome(stage, "done", seconds, result.summary(), None)
    outputs = _record_outputs(stage, ctx.rundir, before)
    # The code may have changed while it ran (an edit mid-run): the stamp says what it started with.
    stamp = {"stage": stage, "run_id": tracker.run_id, "seconds": seconds, "result": result.__dict__,
             "summary": result.summary(), "finished": _now(), "experiment": ctx.recipe.name,
             "tracking_uri": recorder.store, "outputs": outputs, "fingerprint": decision.fingerprint.digest,
             "components": decision.fingerprint.components}
    stamp["models"] = recorder.finished(stage, tracker, IO[stage], stamp,
                                        _upstream_models(ctx.rundir, stage, recorder.store))
    if not secondary_rank():
        write_json(ctx.rundir.result(stage), stamp)
    outcome = Outcome(stage, "done", seconds, stamp["summary"], tracker.run_id, "; ".join(decision.reasons))
    log.info("✔ %s (%.1f s): %s", stage, seconds, outcome.summary)
    return outcome


def _writer_fix(error: BadFile, rundir: RunDir) -> BadFile:
    """A run directory's file that cannot be used is rewritten by the stage that writes it: say which."""
    try:
        rel = Path(error.path).resolve().relative_to(rundir.root.resolve()).as_posix()
    except ValueError:  # not a run-directory file (a dataset, a checkpoint given by path)
        return error
    writer = next((s for s in STAGES if rel in _declared_outputs(rundir, s)), None)
    if writer is None:
        return error
    return error.with_fix(f"rerun `pipeline {writer}` to rewrite it (`pipeline run` does, seeing the file is not the "
                          f"one {writer} recorded)")


def _supersede_stamp(rundir: RunDir, stage: str) -> None:
    """Replace the stamp by one that cannot be reused (no fingerprint) but keeps what the stage last ran
    with, so --explain can still say what changed after a killed or failed rerun."""
    path = rundir.result(stage)
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    components = old.get("components") if isinstance(old, dict) else None
    if secondary_rank():
        return
    if components:
        write_json(path, {"stage": stage, "superseded": True, "started": _now(), "components": components})
    else:
        path.unlink(missing_ok=True)


def _previous_components(rundir: RunDir, stage: str) -> dict | None:
    try:
        old = json.loads(rundir.result(stage).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return old.get("components") if isinstance(old, dict) else None


def _record_outputs(stage: str, rundir: RunDir, before: dict[str, tuple[int, int]]) -> dict[str, str]:
    after = _snapshot(rundir)
    declared = {_rel(rundir, p) for p in _paths(rundir, IO[stage].writes)}
    changed = {rel for rel, sig in after.items() if before.get(rel) != sig}
    return {rel: sha256_file(rundir.root / rel) for rel in sorted((declared & set(after)) | changed)}


def _upstream_models(rundir: RunDir, stage: str, store: str | None) -> dict[str, str]:
    """file -> LoggedModel id, from the stamps of the stages before ``stage`` recorded in ``store`` (a
    model id of another store names nothing here: linking metrics to it fails the stage)."""
    found: dict[str, str] = {}
    for s in STAGES[:STAGES.index(stage)]:
        stamp = read_stamp(rundir, s) or {}
        if stamp.get("tracking_uri") == store:
            found.update(stamp.get("models", {}) or {})
    return found


def _reuse(stage: str, ctx: Context, decision: Decision) -> Outcome:
    stamp = decision.reuse_stamp or {}
    if stamp.get("reused_from_store"):
        write_json(ctx.rundir.result(stage), {k: v for k, v in stamp.items() if k != "reused_from_store"})
    source = f"run {decision.reuse_run_id}" if decision.reuse_run_id else f"an untracked run ({stamp.get('finished', '?')})"
    log.info("↺ %s reused from %s (fingerprint %s)", stage, source, decision.fingerprint.digest[:12])
    return Outcome(stage, "reused", 0.0, stamp.get("summary", ""), decision.reuse_run_id, decision.reasons[0])


def run_pipeline(recipe: Recipe, rundir: RunDir | None = None, stages: tuple[str, ...] | None = None,
                 track: bool = True, device: str | None = None, *, force: Iterable[str] = (),
                 resumes: str | None = None, init_from: str | None = None) -> list[Outcome]:
    """Run ``stages`` (default the recipe's, ``stages_for``) in order, reusing unchanged ones; with
    tracking, one parent MLflow run and a nested run per stage (a reused stage's run says which run it
    reuses)."""
    stages = stages_for(recipe) if stages is None else stages
    if distributed.world_from_env().distributed:
        raise StageError("`pipeline run` runs one process; under torchrun run the train stage alone: "
                         "`pipeline prepare`, then `torchrun --nproc_per_node N -m pipeline.cli train`, then "
                         "`pipeline evaluate` and the later stages")
    stages, force = tuple(_check_stages(stages)), tuple(force)
    _check_stages(f for f in force if f != ALL)  # a misspelt --force name must not silently rerun nothing
    rundir = (rundir or default_rundir(recipe)).ensure()
    with locked(rundir), _signals_as_interrupts():
        recorder = _recorder(track, rundir, recipe.name)
        recover_stale(rundir, recorder)
        recipe_file = _write_recipe(recipe, rundir)
        state = _State(rundir, kind="pipeline", recipe=recipe.to_dict(), stages=list(stages), device=device,
                       track=recorder.store is not None, tracking_uri=recorder.store, resumes=resumes,
                       init_from=init_from, parent_run_id=None)
        try:
            with recorder.pipeline(recipe.to_dict(), stages, recipe_file, resumes) as parent_run_id:
                state.update(parent_run_id=parent_run_id)
                ctx = Context(recipe, rundir, device, pipeline_run_id=parent_run_id, init_from=init_from)
                outcomes = _run_stages(stages, ctx, recorder, state, force)
        except KeyboardInterrupt:
            state.update(status="killed", ended=_now())
            raise
        except PipelineFailed:
            state.update(status="failed", ended=_now())
            raise
        state.update(status="done", ended=_now(), current_stage=None)
    return outcomes


def _run_stages(stages: tuple[str, ...], ctx: Context, recorder: Recorder, state: _State,
                force: tuple[str, ...]) -> list[Outcome]:
    """The stages in order. A failure or an interrupt is recorded (pipeline.json, the recorder) on its way out."""
    outcomes: list[Outcome] = []
    for stage in stages:
        try:
            outcomes.append(_run_or_reuse(stage, ctx, recorder, state, force))
        except KeyboardInterrupt:
            outcomes.append(Outcome(stage, "killed", summary="interrupted"))
            state.update(status="killed", failed_stage=stage)
            recorder.killed(stage)
            raise
        except Exception as e:
            outcomes.append(Outcome(stage, "failed", summary=str(e).splitlines()[0] if str(e) else type(e).__name__))
            state.update(status="failed", failed_stage=stage)
            recorder.failed(stage)
            raise PipelineFailed(outcomes, e) from e
    return outcomes


def _run_or_reuse(stage: str, ctx: Context, recorder: Recorder, state: _State, force: tuple[str, ...]) -> Outcome:
    """Decide (reuse or run) -> run -> stamp."""
    decision = decide(stage, ctx, recorder, force=force)
    if not decision.run:
        outcome = _reuse(stage, ctx, decision)
        state.stage_run(stage, recorder.reused(stage, decision.reuse_run_id, decision.fingerprint.digest, outcome.summary))
        return outcome
    with recorder.stage(stage, decision.reasons, system_metrics=IO[stage].system_metrics) as tracker:
        state.stage_run(stage, tracker.run_id)
        return _execute(stage, ctx, tracker, decision, recorder)


def resume(rundir: RunDir, track: bool | None = None) -> list[Outcome] | None:
    """Continue the last failed or killed pipeline run in ``rundir`` with its recorded recipe and stages.
    Returns None when there is nothing to resume (the last run finished)."""
    with locked(rundir):
        recover_stale(rundir, _recorder(True if track is None else track, rundir))
    state = read_state(rundir)
    if state is None or state.get("kind", "pipeline") != "pipeline" or "recipe" not in state:
        raise StageError(f"no pipeline run to resume in {rundir.root} (no {rundir.state.name}); start one with `pipeline run`")
    if state.get("status") == "done":
        return None
    first = next((s for s in state["stages"] if read_stamp(rundir, s) is None), state.get("failed_stage"))
    log.info("resuming the %s pipeline run %s in %s from stage %s", state.get("status"),
             state.get("parent_run_id") or "(untracked)", rundir.root, first)
    return run_pipeline(recipe_from_dict(state["recipe"]), rundir, tuple(state["stages"]),
                        track=state.get("track", True) if track is None else track, device=state.get("device"),
                        resumes=state.get("parent_run_id") or None, init_from=state.get("init_from"))


def run_stage(stage: str, recipe: Recipe, rundir: RunDir | None = None, track: bool = True,
              device: str | None = None, resume: bool = False, init_from: str | None = None) -> Outcome:
    """One stage in a run of its own (a `pipeline <stage>` command): always runs, and stamps its outputs
    so a later `pipeline run` can reuse them. Under torchrun only rank 0 records in MLflow."""
    _check_stages([stage])
    if stage not in stages_for(recipe):
        raise StageError(f"stage {stage} does not apply to recipe {recipe.name} (model.family {recipe.model.family}"
                         f"{', no data' if recipe.prepare.dataset == 'none' else ''}); its stages are "
                         f"{', '.join(stages_for(recipe))}")
    rundir = (rundir or default_rundir(recipe)).ensure()
    with locked(rundir), _signals_as_interrupts():
        recorder = _recorder(track, rundir, recipe.name)
        recover_stale(rundir, recorder)
        ctx = Context(recipe, rundir, device, resume=resume, init_from=init_from)
        decision = Decision(stage, True, [f"`pipeline {stage}` always runs"], compute_fingerprint(stage, ctx, recorder.store))
        with recorder.stage(stage, decision.reasons, system_metrics=IO[stage].system_metrics) as tracker:
            return _execute(stage, ctx, tracker, decision, recorder)
