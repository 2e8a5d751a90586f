"""whaleid command line: the table of contents of the pipeline.

    whaleid synth       --out DIR                  a synthetic data set in the Kaggle layout
    whaleid preprocess  --data DATA --work WORK    dedup -> format -> boxes -> augment -> split
    whaleid train       --work WORK                the classifier (or an embedding head)
    whaleid predict     --work WORK                TTA top-5 + new_whale threshold -> submission.csv
    whaleid evaluate    --work WORK                open-set MAP@5 on the validation split
    whaleid status      --work WORK                which stages are done, stale (why) or missing
    whaleid import-folders --src ROOT --out DIR    ROOT/<id>/*.jpg -> the Kaggle layout + solution.csv
    whaleid report      --work WORK                PNG sheets and plots of the artifacts + index.html
    whaleid identify    --work WORK --photos DIR   new photos vs the catalogue -> review.html; --accept

Every stage is cached in WORK (see whaleid/pipeline/stage.py); a command runs the stages it needs that are
not up to date, so rerunning after a pre-empted VM continues where it stopped.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import click

# TensorFlow's C++ start-up and log lines are not for users (whaleid --verbose shows them); set before
# anything imports TensorFlow. Its load-time lines, which ignore this, are filtered by
# files.quiet_native_startup where a stage module is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from whaleid.learning import cluster  # noqa: E402
from whaleid.pipeline import config, stage as stagelib  # noqa: E402
from whaleid.pipeline.files import VERBOSE, quiet_native_startup  # noqa: E402
from whaleid.stages import ALL as ALL_STAGES, BY_COMMAND, status_line, wanted as wanted_stages  # noqa: E402
from whaleid.pipeline.stage import Session, StageError  # noqa: E402
from whaleid.data.tables import TableError  # noqa: E402
from whaleid.metrics.summary import summary_lines  # noqa: E402
from whaleid.similarity import threshold  # noqa: E402
from whaleid.pipeline.workfolder import (fallback_rows, is_dir_or_error, open_work, test_photo_warning,  # noqa: E402
                                         unusable_test_photos, write_record)


# ---------------------------------------------------------------- shared options and the session

def common(fn):
    @click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("work"),
                  show_default=True, help="Folder for artifacts (the stage cache).")
    @click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Data folder in the Kaggle layout (train.csv, sample_submission.csv, train/, test/). "
                       "Remembered in WORK after the first use.")
    @click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="TOML settings: a file, or a shipped config's name (cpu, default); default: the one WORK "
                       "was last run with, else default.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a setting, e.g. --set train.epochs=5 (repeatable; remembered in WORK).")
    @click.option("--unset", "unset", multiple=True, metavar="KEY",
                  help="Forget a remembered --set value, e.g. --unset train.epochs (repeatable).")
    @click.option("--reset-settings", "reset", is_flag=True,
                  help="Forget every remembered --set value and the remembered config.")
    @click.option("--force", default=None, is_flag=False, flag_value="*", metavar="[STAGE]",
                  help="Rerun STAGE and everything downstream of it; alone, rerun every stage of the command.")
    @click.option("--workers", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True,
                  help="Processes for per-image work.")
    @click.option("--quiet", is_flag=True, help="No progress bars.")
    @click.option("--verbose", is_flag=True, help="Also show TensorFlow's start-up and log lines.")
    @functools.wraps(fn)
    def wrapper(**kw):
        if kw.get("verbose"):
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
            os.environ[VERBOSE] = "1"
        try:
            return fn(**kw)
        except (StageError, config.ConfigError, TableError) as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def open_session(work, data, config_file, overrides, workers, quiet, unset=(), reset=False, **_):
    """(session, the settings record to write if the command runs) for WORK; notes are printed."""
    opened = open_work(work, data, config_file, overrides, workers, quiet, ALL_STAGES, unset, reset, click.echo)
    for note in opened.notes:
        click.echo(f"whaleid: {note}", err=True)
    return opened.session, opened.record


def run_command(command: str, kw: dict, extra_sets: tuple[str, ...] = (), targets: list[str] | None = None) -> Session:
    """Run the stages `command` needs (or `targets` and what they need) that are not up to date."""
    kw = dict(kw)
    kw["overrides"] = tuple(kw["overrides"]) + extra_sets
    session, record = open_session(**kw)
    needed = set(targets or [s.name for s in BY_COMMAND[command]])
    needed |= wanted_stages(session.cfg, needed)  # e.g. the keypoint stages when re-ranking
    for st in reversed(session.stages):  # pipeline order: add what the needed stages read
        if st.name in needed:
            needed |= set(st.upstream)
    stages = [st for st in session.stages if st.name in needed]
    force = set()
    if kw["force"] == "*":
        force = {s.name for s in BY_COMMAND[command]}
    elif kw["force"]:
        owner = {s.name: c for c, ss in BY_COMMAND.items() for s in ss}
        if kw["force"] not in owner:
            raise StageError(f"--force {kw['force']}: no such stage (stages: {', '.join(s.name for s in session.stages)})")
        if kw["force"] not in needed:
            raise StageError(f"--force {kw['force']}: {kw['force']} is not a stage of whaleid {command}, which runs "
                             f"{', '.join(s.name for s in stages)}; to rerun it: whaleid {owner[kw['force']]} "
                             f"--force {kw['force']}")
        force = {kw["force"]}
    if session.data is None:  # before anything is written: a bare `whaleid train` creates no ./work
        seen: dict = {}
        for st in stages:
            if st.data and (st.name in session.downstream(force) or not session.status(st, seen).done):
                raise StageError(f"whaleid {command} needs the data folder (stage {st.name} reads it and is not up "
                                 f"to date in {session.work}): pass --data DIR (train.csv, sample_submission.csv, "
                                 f"train/, test/)")
    write_record(session, record)
    try:
        # (a multi-worker training: only the chief takes the lock and writes; cluster.py)
        cluster.run_stages(session, stages, force, command, stagelib.work_lock)
    finally:
        session.close()
    return session


def warn_test_photos(session: Session, strict: bool) -> None:
    """A loud line when test photos are missing or unreadable; an error with --strict."""
    missing, total, files = unusable_test_photos(session)
    if missing:
        text = test_photo_warning(missing, total, files)
        if strict:
            raise StageError(text.replace("WARNING: ", "").replace(" --strict makes this an error.", " (--strict)"))
        click.secho(text, err=True, fg="yellow", bold=True)


STRICT = click.option("--strict", is_flag=True, help="Missing or unreadable test photos are an error, not a warning.")


# ---------------------------------------------------------------- commands

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="whaleid")
def main():
    """Identify individual whales (and other animals) from photos.

    Every command runs each stage it needs that is not up to date, and only those (the cache is
    in --work): `whaleid predict --data DATA` alone runs the whole pipeline, preprocess -> train ->
    predict. Rerunning a command after a pre-empted VM continues where it stopped.
    """


@main.command(short_help="Dedup, 3-channel format, tail boxes, offline augmentation, validation split.")
@common
@click.option("--boxes", "box_csv", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Import tail boxes from a CSV Image,x0,y0,x1,y1 instead of detecting them.")
@STRICT
def preprocess(box_csv, strict, **kw):
    """Dedup, 3-channel format, tail boxes, offline augmentation, validation split."""
    extra = (f"boxes.import_csv={json.dumps(str(box_csv.resolve()))}",) if box_csv else ()
    session = run_command("preprocess", kw, extra)
    warn_test_photos(session, strict)
    click.echo(f"preprocess: done; artifacts in {session.work}")


@main.command(short_help="Train the model (preprocessing first if needed); resumes after a kill.")
@common
def train(**kw):
    """Train the classifier (or an embedding head) on the preprocessed images, running preprocess
    first if needed; resumes after a kill."""
    session = run_command("train", kw)
    m = session.manifest("train") or {}
    click.echo("train: " + ", ".join(f"{k} {v}" for k, v in m.get("counts", {}).items()))


@main.command(short_help="Open-set MAP@5 on the validation split; --tune-threshold for predict.")
@common
@click.option("--tune-threshold", is_flag=True,
              help="Store the best new_whale threshold of the sweep in WORK; predict then uses it.")
@click.option("--submission", "submission_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Score this submission file against --solution instead (no work folder needed).")
@click.option("--solution", "solution_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Solution table Image,Id for --submission.")
@click.option("--one-shot", "one_shot", type=click.IntRange(min=2), default=None, metavar="N",
              help="Also N-way one-shot accuracy (sets evaluate.one_shot; remembered in WORK).")
def evaluate(tune_threshold, submission_file, solution_file, one_shot, **kw):
    """Open-set MAP@5 on the validation split (held-out ids play the new whales)."""
    from whaleid.metrics import submission
    if submission_file or solution_file:
        if not (submission_file and solution_file):
            raise click.UsageError("--submission and --solution go together")
        try:
            r = submission.score_files(submission_file, solution_file)
        except submission.SubmissionError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"{submission_file}: MAP@5 {r['map5']:.4f}, top-1 {r['top1']:.4f}, "
                   f"all-new_whale baseline {r['all_new_whale_map5']:.4f} ({r['images']} images)")
        return
    session = run_command("evaluate", kw, (f"evaluate.one_shot={one_shot}",) if one_shot else ())
    m = json.loads((session.dir("evaluate") / "metrics.json").read_text())
    for line in summary_lines(m):
        click.echo(line)
    placed, untunable = threshold.tuning_obstacles(config.get(session.cfg, "new_whale.share"), m["new_whale_share"])
    if tune_threshold and placed:
        click.echo(f"  not tuning the threshold: {placed}")
        return
    if untunable:
        if tune_threshold:
            raise click.ClickException(f"not tuning the threshold: {untunable}")
        click.secho(f"WARNING: {untunable}", err=True, fg="yellow", bold=True)
    if tune_threshold:
        thr = threshold.tune(session.work)
        click.echo(f"  stored threshold {thr:.2f} in {session.work / threshold.TUNED}; predict will use it")


@main.command(short_help="WORK/submission.csv, running every stage it needs first (the whole pipeline).")
@common
@click.option("--check", "check_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Only validate this submission file against the data folder's sample_submission.csv.")
@STRICT
def predict(check_file, strict, **kw):
    """TTA top-5 with the new_whale threshold -> WORK/submission.csv. Runs every stage it needs that
    is not up to date first: with --data alone, the whole pipeline (preprocess, train, predict)."""
    from whaleid.metrics import submission
    from whaleid.data.tables import read_test
    if check_file:
        session, _ = open_session(**kw)
        if session.data is None:
            raise click.ClickException("--check needs --data (the folder with sample_submission.csv)")
        order, _ = read_test(session.data / "sample_submission.csv")
        k = config.get(session.cfg, "predict.top_k")
        try:
            submission.validate(submission.read_submission(check_file), list(order.Image), k, source=str(check_file))
        except submission.SubmissionError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"{check_file}: valid ({len(order)} images, {k} distinct labels each)")
        return
    if strict:  # an error before the submission is written
        upstream = [s for s in BY_COMMAND["predict"][0].upstream]
        warn_test_photos(run_command("predict", kw, targets=upstream), strict=True)
    session = run_command("predict", kw)
    guessed, rows = fallback_rows(session)
    if guessed:
        click.secho(f"WARNING: {guessed} of {rows} rows of {session.work / 'submission.csv'} are guesses (new_whale "
                    f"first): their test photos are missing or unreadable; see {session.dir('predict') / 'predictions.csv'} "
                    f"(source fallback) and {session.dir('dedup') / 'skipped.csv'}. --strict makes this an error.",
                    err=True, fg="yellow", bold=True)
    click.echo(f"submission: {session.work / 'submission.csv'}")


@main.command(short_help="New photos vs the catalogue -> matches.csv + review.html; --accept the decisions.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("work"), show_default=True)
@click.option("--photos", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Folder of new photos (nested folders allowed; files that are not photos are skipped and listed).")
@click.option("--batch", default=None, help="Name of the batch: WORK/identify/BATCH/ (default: the folder's name).")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Candidates per photo (identify.top, 5).")
@click.option("--accept", "decisions", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Add the photos of a decisions.csv (exported by review.html) to the catalogue.")
@click.option("--into", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="With --accept: copy the photos into DATA/train/ and append DATA/train.csv (else WORK/catalogue/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a setting for this batch.")
@click.option("--workers", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True)
@click.option("--quiet", is_flag=True)
def identify(work, photos, batch, top, decisions, into, overrides, workers, quiet):
    """Rank every photo of --photos against the catalogue the model was trained on (no retraining, no
    data folder needed) and write matches.csv and review.html; or --accept a review's decisions."""
    if bool(photos) == bool(decisions) or (into and not decisions):
        raise click.UsageError("give --photos DIR (identify a batch) or --accept decisions.csv [--into DATA]")
    try:
        if decisions:
            from whaleid.inference import accept
            accept.accept(work, decisions, into, echo=click.echo)
            return
        with quiet_native_startup():
            from whaleid.inference import identify as identification
        folder = identification.command(work, photos, batch, top, overrides, workers, quiet, echo=click.echo)
    except (StageError, config.ConfigError) as e:
        raise click.ClickException(str(e)) from None
    counts = json.loads((folder / stagelib.MANIFEST).read_text())["counts"]
    click.echo(f"identify: {counts['photos']} photos ranked ({counts['skipped']} files skipped), "
               f"{counts['new_individuals']} flagged as new individuals: {folder / 'matches.csv'}")
    click.echo(f"  review: {(folder / 'review.html').resolve().as_uri()}")


@main.command(short_help="Each stage: done, stale (and why) or missing, with its artifacts.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("work"), show_default=True)
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Check against this data folder (default: the one WORK was run with).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def status(work, data, config_file, overrides):
    """Each stage: done / stale (why) / missing, with its artifacts."""
    try:
        session, _ = open_session(work, data, config_file, overrides, os.cpu_count() or 1, True)
        is_dir_or_error(work)
    except (StageError, config.ConfigError) as e:
        raise click.ClickException(str(e)) from None
    seen: dict = {}
    for st in session.stages:
        s = session.status(st, seen)
        click.echo(status_line(st.name, s, session.cfg))
        if s.manifest:
            for name in s.manifest["artifacts"]:
                click.echo(f"{'':<20}{session.dir(st.name) / name}")
    session.close()


@main.command(short_help="PNG sheets and plots of WORK's artifacts, and an index.html.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("work"), show_default=True)
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Data folder with the photos (default: the one WORK was run with).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNGs and index.html (default WORK/report).")
@click.option("--sample", type=click.IntRange(min=1), default=12, show_default=True,
              help="Photos per box method, and test photos on the predictions sheet.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample.")
def report(work, data, out, sample, seed):
    """PNG sheets and plots of WORK's artifacts (boxes, duplicates, training curves, MAP@5 vs threshold,
    predictions) and an index.html that shows them; a stage that has not run is one line of the page."""
    from whaleid.report import page as reportlib
    if not Path(work).is_dir():
        raise click.ClickException(f"work folder {work} not found: run whaleid preprocess --work {work} first")
    if data is not None and not Path(data).is_dir():
        raise click.ClickException(f"data folder {data} not found")
    try:
        index = reportlib.write_report(work, data, out=out, sample=sample, seed=seed)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report: {index.resolve().as_uri()}")


@main.command(short_help="Write a synthetic data set in the Kaggle layout.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder to create.")
@click.option("--ids", type=click.IntRange(min=2), default=50, show_default=True, help="Known individuals.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--photos", default="longtail", show_default=True,
              help="Photos per individual: longtail | real | uniform:K.")
@click.option("--real-train-csv", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="A real train.csv whose per-id photo counts --photos real follows.")
@click.option("--size-scale", type=float, default=1.0, show_default=True, help="Scale of image sizes.")
@click.option("--workers", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True)
@click.option("--quiet", is_flag=True)
def synth(out, ids, seed, photos, real_train_csv, size_scale, workers, quiet):
    """Write a synthetic data set (Kaggle layout + solution.csv, boxes.csv, duplicates.csv)."""
    from whaleid.datasets import synth as synthlib
    try:
        summary = synthlib.generate(out, ids=ids, seed=seed, workers=workers, photos=photos,
                                    real_train_csv=real_train_csv, size_scale=size_scale, progress=not quiet)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"synth: wrote {out}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))


@main.command("import-folders", short_help="A catalogue of one folder per individual -> the Kaggle layout.")
@click.option("--src", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="Catalogue with one folder per individual: SRC/<id>/*.jpg|png (nested folders allowed).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="New data folder (Kaggle layout + solution.csv, boxes.csv).")
@click.option("--new-fraction", type=float, default=0.3, show_default=True,
              help="Share of individuals held out entirely: their photos are test photos answered new_whale.")
@click.option("--query-fraction", type=float, default=0.3, show_default=True,
              help="Share of each other individual's photos that become test queries (one always stays in train).")
@click.option("--train-only", "train_only", multiple=True,
              type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Another catalogue ROOT/<id>/*.jpg|png whose individuals are only learnt from: all their photos "
                   "go to train.csv, none is tested (repeatable).")
@click.option("--encounter", "encounter", default=None, metavar="REGEX",
              help="The encounter of each photo, as the first group of REGEX on its file name (e.g. '^(\\d+)_' for "
                   "<sighting>_leftphoto.jpg): photos of one encounter are never split between gallery and queries.")
@click.option("--side", "side", default=None, metavar="REGEX",
              help="The side of each photo (left or right flank), as the first group of REGEX on its file name "
                   "(e.g. '_(left|right)photo'); photos it does not match are of unknown side.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True)
def import_folders(src, out, new_fraction, query_fraction, train_only, encounter, side, seed, quiet):
    """Convert ROOT/<id>/*.jpg|png into the Kaggle layout with a solution.csv."""
    from whaleid.datasets import import_folders as importer
    try:
        summary = importer.import_folders(src, out, new_fraction=new_fraction, query_fraction=query_fraction,
                                          seed=seed, progress=not quiet, train_only=train_only, encounter=encounter,
                                          side=side)
    except importer.FolderError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"import-folders: wrote {out}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    if summary["skipped"]:
        click.echo(f"  {summary['skipped']} files were not readable photos: see {out / 'skipped.csv'}")
    for line in importer.next_steps(out):
        click.echo(line)

if __name__ == "__main__":
    main()
