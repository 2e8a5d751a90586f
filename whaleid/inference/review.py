"""review.html: the page where a person confirms identify's matches, one file that opens from disk and
works offline (photos embedded as small JPEG data URIs, no script or style from anywhere else).

Per photo: its crop beside each candidate id's best matching catalogue photo, the score and what it
means (the precision on validation photos at that score: of the validation photos whose best score was
at least this, the share whose best id was right; from evaluate's val_predictions.csv when evaluate
ran on this model), and buttons "same as <id>", "new individual" (with a name field), "skip"; a catalogue id
typed into the name field is "same as" that id (for an individual the candidates miss). With
rerank.method = local, also the id's best photo by local features, the matched points joined (local.py).
Decisions live in the browser's localStorage under a key of this page's batch and photos, so they
survive reloads, a closed browser and the batch ranked again; "Export decisions.csv" writes photo,decision,id,batch for
`whaleid identify --accept`. Keys: 1-9 same as candidate k, n new individual (name field), s skip,
j / k next / previous photo.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from whaleid.pipeline.files import write_bytes

THUMB = 160          # px: the side of the crops shown (and embedded) in the page
QUALITY = 80


def jpeg_bytes(rgb: np.ndarray, side: int = THUMB) -> bytes:
    """A small JPEG of an RGB array (longer side at most `side`)."""
    h, w = rgb.shape[:2]
    if max(h, w) > side:
        f = side / max(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def file_thumbnail(path: Path) -> bytes | None:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if img is None else jpeg_bytes(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))


class Calibration:
    """What a score means on validation: precision(s) = share of validation photos with best score >= s
    whose best id was their id (new whales count as wrong: their best id is never right)."""

    def __init__(self, scores=(), correct=(), source: str = "", why: str = ""):
        order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
        self.scores = np.asarray(scores, np.float64)[order]
        self.hits = np.cumsum(np.asarray(correct, np.float64)[order])
        self.source, self.why = source, why

    @property
    def available(self) -> bool:
        return len(self.scores) > 0

    def at(self, score: float) -> tuple[float | None, int]:
        """(precision, validation photos scoring at least `score`)."""
        n = int(np.searchsorted(-self.scores, -float(score), side="right"))
        return (None, 0) if n == 0 else (float(self.hits[n - 1] / n), n)

    def precision(self, score: float):
        p, _ = self.at(score)
        return "" if p is None else round(p, 4)


def calibration(work: Path, model: str | None) -> Calibration:
    """From WORK/evaluate (val_predictions.csv with top_id and top_score), when evaluate ran on `model`."""
    folder = Path(work) / "evaluate"
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        val = pd.read_csv(folder / "val_predictions.csv", dtype={"Image": str, "truth": str, "top_id": str},
                          keep_default_na=False)
    except (OSError, ValueError):
        return Calibration(why="no validation run for this model: run whaleid evaluate --work WORK to see what scores mean")
    if metrics.get("model") not in (None, model):
        return Calibration(why="evaluate's validation ran on another model: run whaleid evaluate again")
    if not {"top_id", "top_score"} <= set(val.columns):
        return Calibration(why="evaluate's val_predictions.csv predates scores: run whaleid evaluate --force evaluate")
    return Calibration(val.top_score.astype(float), (val.top_id == val.truth).to_numpy(), str(folder / "val_predictions.csv"))


def _uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def write(path: Path, batch: str, matches: pd.DataFrame, thumbs: dict[str, bytes], work: Path, threshold: float,
          calib: Calibration, skipped: list[tuple[str, str]], drawn: dict | None = None, note: str = "",
          ids: list[str] = (), encounter_note: str = "") -> None:
    """review.html for one batch: matches (photo, rank, id, score, new_individual, catalogue_photo under
    WORK), thumbs (photo -> JPEG of its crop), drawn (photo -> {id: (JPEG of the photo and the id's best
    photo by local features, matched points joined; caption)}, local.py), ids (the catalogue's: one typed
    into the name field makes the decision "same as" it)."""
    drawn = drawn or {}
    pictures, photos = {}, []
    for photo, rows in matches.groupby("photo", sort=False):
        pictures[f"q:{photo}"] = _uri(thumbs[photo])
        cands = []
        for r in rows.sort_values("rank").itertuples():
            key = f"c:{r.catalogue_photo}"
            if r.catalogue_photo and key not in pictures:
                data = file_thumbnail(Path(work) / r.catalogue_photo)
                pictures[key] = _uri(data) if data else ""
            p, n = calib.at(r.score)
            pair = drawn.get(photo, {}).get(r.id)
            if pair:
                pictures[f"m:{photo}:{r.id}"] = _uri(pair[0])
            cands.append({"id": r.id, "score": float(r.score), "precision": p, "n": n,
                          "img": key if r.catalogue_photo else "", "pair": f"m:{photo}:{r.id}" if pair else "",
                          "pair_caption": pair[1] if pair else ""})
        photos.append({"photo": photo, "img": f"q:{photo}", "new": bool(rows.new_individual.iloc[0]),
                       "candidates": cands})
    # the key names the batch and its photos, not the candidates: a batch ranked again (a grown
    # catalogue, another model) keeps the decisions made on it
    digest = hashlib.sha1("\n".join(sorted(thumbs)).encode()).hexdigest()[:12]
    data = {"batch": batch, "key": f"whaleid-review:{batch}:{digest}", "threshold": round(float(threshold), 4),
            "calibration": calib.source, "calibration_note": calib.why, "pairs_note": note, "encounter_note": encounter_note,
            "photos": photos,
            "ids": sorted(ids),
            "pictures": pictures,
            "skipped": [{"photo": p, "reason": r} for p, r in skipped]}
    blob = json.dumps(data).replace("</", "<\\/")
    page = (PAGE.replace("__TITLE__", html.escape(f"whaleid review: {batch}"))
            .replace("__DATA__", blob).replace("__SCRIPT__", SCRIPT).replace("__STYLE__", STYLE))
    write_bytes(Path(path), page.encode())


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>__STYLE__</style></head>
<body>
<header><h1>__TITLE__</h1><p id="summary"></p><p id="meaning"></p>
<p><span id="progress"></span> <button id="export" type="button">Export decisions.csv</button>
<button id="clear" type="button">Forget all decisions</button></p>
<p class="keys">Keys: <b>1</b>-<b>9</b> same as candidate k &middot; <b>n</b> new individual (type its name,
Enter) &middot; <b>s</b> skip &middot; <b>j</b> / <b>k</b> next / previous photo</p></header>
<main id="cards"></main>
<section id="skipped"></section>
<script id="data" type="application/json">__DATA__</script>
<script>__SCRIPT__</script>
</body></html>
"""

STYLE = """
body{font-family:system-ui,sans-serif;margin:0 1.5em 3em;background:#f6f6f4;color:#222}
header{position:sticky;top:0;background:#f6f6f4;border-bottom:1px solid #ccc;padding:.3em 0;z-index:2}
h1{font-size:1.2em;margin:.3em 0}.keys{color:#555;font-size:.9em}
.card{background:#fff;border:2px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em}
.card.current{border-color:#2a6fdb}.card.decided{background:#f0f7ee}
.row{display:flex;gap:.8em;flex-wrap:wrap;align-items:flex-start}
figure{margin:0;width:170px;font-size:.85em}figure img{width:160px;height:160px;object-fit:contain;background:#222;display:block}
figure.query{width:190px}figure.query img{border:3px solid #2a6fdb}
figure img.pair{width:160px;height:auto;margin-top:.3em;cursor:zoom-in;background:#fff}
#zoom{position:fixed;inset:0;background:rgba(0,0,0,.75);z-index:5;display:flex;flex-direction:column;
align-items:center;justify-content:center;color:#fff;cursor:zoom-out}#zoom img{max-width:90vw;max-height:80vh;background:#fff}
.flag{color:#b35c00;font-weight:bold}.decision{font-weight:bold;color:#1d6b2a;margin:.4em 0}
button{margin:.2em .2em 0 0}button.chosen{background:#1d6b2a;color:#fff}
.actions{margin-top:.5em}.actions input{width:12em}
"""

SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById('data').textContent);
  const KEY = data.key;
  let decisions = {};
  try { decisions = JSON.parse(localStorage.getItem(KEY) || '{}'); } catch (e) { decisions = {}; }
  let current = 0;
  const cards = [];
  function save() { localStorage.setItem(KEY, JSON.stringify(decisions)); }
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function meaning(c) {
    if (!data.calibration) return '';
    if (c.precision === null || c.precision === undefined) return 'no validation photo scored this high';
    return 'validation: ' + Math.round(c.precision * 100) + '% right at >= this score (n=' + c.n + ')';
  }
  function zoom(src, caption) {
    const box = el('div', {id: 'zoom'});
    box.appendChild(el('img', {src: src, alt: caption}));
    box.appendChild(el('div', {}, caption + ' (click or Escape to close)'));
    box.addEventListener('click', function () { box.remove(); });
    document.body.appendChild(box);
  }
  function suggested(i) { return 'NEW-' + data.batch + '-' + (i + 1); }
  function render(i) {
    const p = data.photos[i], card = cards[i], d = decisions[p.photo];
    card.classList.toggle('decided', !!d);
    card.querySelectorAll('button').forEach(b => b.classList.remove('chosen'));
    const text = card.querySelector('.decision');
    if (!d) { text.textContent = 'no decision yet'; }
    else if (d.decision === 'same') { text.textContent = 'decision: same as ' + d.id;
      const b = card.querySelector('button.same[data-id="' + CSS.escape(d.id) + '"]'); if (b) b.classList.add('chosen'); }
    else if (d.decision === 'new') { text.textContent = 'decision: new individual ' + d.id; card.querySelector('button.new').classList.add('chosen'); }
    else { text.textContent = 'decision: skip'; card.querySelector('button.skip').classList.add('chosen'); }
    const done = data.photos.filter(q => decisions[q.photo]).length;
    document.getElementById('progress').textContent = done + ' of ' + data.photos.length + ' photos decided';
  }
  function decide(i, decision, id) {
    decisions[data.photos[i].photo] = {decision: decision, id: id || ''};
    save(); render(i);
    if (i === current && i + 1 < cards.length) focus(i + 1);
  }
  const known = new Set(data.ids);
  function decideNew(i) {  // the name field: a new individual's name, or a catalogue id not among the candidates
    const input = cards[i].querySelector('input.name');
    const name = (input.value || '').trim() || suggested(i);
    input.value = name;
    decide(i, known.has(name) ? 'same' : 'new', name);
  }
  function select(i) {
    cards[current].classList.remove('current');
    current = i; cards[i].classList.add('current');
  }
  function focus(i) {
    if (i < 0 || i >= cards.length) return;
    select(i);
    cards[i].scrollIntoView({block: 'center'});
  }
  const main = document.getElementById('cards');
  data.photos.forEach(function (p, i) {
    const card = el('div', {class: 'card', id: 'photo-' + i, 'data-photo': p.photo});
    const row = el('div', {class: 'row'});
    const q = el('figure', {class: 'query'});
    q.appendChild(el('img', {src: data.pictures[p.img], alt: p.photo}));
    q.appendChild(el('figcaption', {}, (i + 1) + '. ' + p.photo));
    if (p['new']) q.appendChild(el('div', {class: 'flag'}, 'model: new individual? (best score under ' + data.threshold + ')'));
    row.appendChild(q);
    p.candidates.forEach(function (c, k) {
      const f = el('figure', {class: 'candidate'});
      f.appendChild(el('img', {src: c.img ? data.pictures[c.img] : '', alt: c.id}));
      const cap = el('figcaption');
      cap.appendChild(el('b', {}, (k + 1) + '. ' + c.id));
      cap.appendChild(el('div', {}, 'score ' + c.score.toFixed(3)));
      cap.appendChild(el('div', {class: 'meaning'}, meaning(c)));
      f.appendChild(cap);
      if (c.pair) {
        const m = el('img', {class: 'pair', src: data.pictures[c.pair], alt: c.pair_caption, title: c.pair_caption + ' (click: larger)'});
        m.addEventListener('click', function () { zoom(m.src, c.pair_caption); });
        f.appendChild(m); f.appendChild(el('div', {class: 'meaning'}, c.pair_caption));
      }
      const b = el('button', {type: 'button', class: 'same', 'data-id': c.id, 'data-k': k + 1}, 'same as ' + c.id);
      b.addEventListener('click', function () { select(i); decide(i, 'same', c.id); });
      f.appendChild(b);
      row.appendChild(f);
    });
    card.appendChild(row);
    const actions = el('div', {class: 'actions'});
    const name = el('input', {type: 'text', class: 'name', placeholder: suggested(i), 'aria-label': 'name of the new individual',
      title: "a new individual's name, or the id of a catalogue individual the candidates miss"});
    name.addEventListener('keydown', function (e) { if (e.key === 'Enter') { select(i); decideNew(i); name.blur(); } e.stopPropagation(); });
    const nb = el('button', {type: 'button', class: 'new'}, 'new individual');
    name.addEventListener('input', function () {
      const v = name.value.trim(); nb.textContent = known.has(v) ? 'same as ' + v : 'new individual'; });
    nb.addEventListener('click', function () { select(i); decideNew(i); });
    const sb = el('button', {type: 'button', class: 'skip'}, 'skip');
    sb.addEventListener('click', function () { select(i); decide(i, 'skip', ''); });
    actions.append(name, nb, sb);
    card.appendChild(actions);
    card.appendChild(el('div', {class: 'decision'}));
    card.addEventListener('click', function (e) { if (!e.target.closest('button, input')) select(i); });
    main.appendChild(card);
    cards.push(card);
  });
  const prev = new Set(Object.keys(decisions));
  data.photos.forEach(function (p, i) { render(i); });
  if (cards.length) { const first = data.photos.findIndex(p => !prev.has(p.photo)); focus(first < 0 ? 0 : first); window.scrollTo(0, 0); }
  document.getElementById('summary').textContent = data.photos.length + ' photos of batch ' + data.batch +
    '; the model flags a photo as a new individual when its best score is under ' + data.threshold + '.';
  document.getElementById('meaning').textContent = (data.calibration ?
    'Scores are read on validation (' + data.calibration + ').' : data.calibration_note) +
    (data.pairs_note ? ' ' + data.pairs_note + '.' : '') +
    (data.encounter_note ? ' ' + data.encounter_note + '.' : '');
  if (data.skipped.length) {
    const s = document.getElementById('skipped');
    s.appendChild(el('h2', {}, data.skipped.length + ' files skipped (not usable photos)'));
    const ul = el('ul'); data.skipped.forEach(x => ul.appendChild(el('li', {}, x.photo + ': ' + x.reason))); s.appendChild(ul);
  }
  function quote(v) { v = String(v); return /[",\n\r]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
  window.whaleidDecisionsCsv = function () {
    const lines = ['photo,decision,id,batch'];
    data.photos.forEach(function (p) { const d = decisions[p.photo];
      if (d) lines.push([p.photo, d.decision, d.id, data.batch].map(quote).join(',')); });
    return lines.join('\n') + '\n';
  };
  document.getElementById('export').addEventListener('click', function () {
    const a = el('a', {download: 'decisions.csv'});
    a.href = URL.createObjectURL(new Blob([window.whaleidDecisionsCsv()], {type: 'text/csv'}));
    document.body.appendChild(a); a.click(); a.remove();
  });
  document.getElementById('clear').addEventListener('click', function () {
    if (confirm('Forget every decision of this batch?')) { decisions = {}; save(); data.photos.forEach((p, i) => render(i)); }
  });
  document.addEventListener('keydown', function (e) {
    const z = document.getElementById('zoom');
    if (z) { if (e.key === 'Escape') z.remove(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey || !cards.length) return;
    const p = data.photos[current];
    if (e.key >= '1' && e.key <= '9') { const c = p.candidates[Number(e.key) - 1]; if (c) decide(current, 'same', c.id); }
    else if (e.key === 'n') { e.preventDefault(); cards[current].querySelector('input.name').focus(); }
    else if (e.key === 's') decide(current, 'skip', '');
    else if (e.key === 'j') focus(current + 1);
    else if (e.key === 'k') focus(current - 1);
  });
})();
"""
