"""A two-stage toy pipeline for testing the stage cache, also runnable as a subprocess:
    python toy_pipeline.py WORK DATA [slow]
'slow' makes stage `a` write its artifact in pieces with pauses, so a test can SIGKILL it mid-write."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from whaleid.pipeline import config  # noqa: E402
from whaleid.pipeline.stage import Session, Stage, atomic_path  # noqa: E402

CALLS = []


def run_a(run):
    CALLS.append("a")
    text = (run.data / "in.txt").read_text()
    slow = "slow" in sys.argv[3:]
    with atomic_path(run.path("a.pickle")) as tmp:
        with open(tmp, "wb") as f:
            import pickle
            data = pickle.dumps({"text": text * (2000 if slow else 1), "seed": run.setting("run.seed")})
            for i in range(0, len(data), max(1, len(data) // 10)):
                f.write(data[i:i + max(1, len(data) // 10)])
                f.flush()
                if slow:
                    print("writing", flush=True)
                    time.sleep(0.3)
    items = run.path("items")
    items.mkdir(exist_ok=True)
    done_before = len(list(items.iterdir()))
    for i in range(4):
        p = items / f"{i}.txt"
        if run.resume and p.exists():
            continue
        p.write_text(str(i))
    return {"items": 4, "resumed_items": done_before}


def run_b(run):
    CALLS.append("b")
    a = run.load_pickle("a", "a.pickle")
    run.write_json("b.json", {"length": len(a["text"]), "scale": run.setting("augment.margin")})
    return {"length": len(a["text"])}


STAGES = [
    Stage("a", run_a, artifacts=("a.pickle", "items/"), settings=("run.seed",), data=("in.txt",)),
    Stage("b", run_b, artifacts=("b.json",), settings=("augment.margin",), upstream=("a",)),
]


def session(work, data, overrides=()):
    return Session(cfg=config.load(None, tuple(overrides)), work=Path(work), data=Path(data),
                   stages=STAGES, echo=lambda m: None)


if __name__ == "__main__":
    s = session(sys.argv[1], sys.argv[2])
    s.run(STAGES)
    print("finished", flush=True)
