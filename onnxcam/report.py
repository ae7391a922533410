"""``index.html``: a static report of a run that opens from the file system, no server, no network.

A grid of cards (the predicted label and probability, the overlay of that class's map where there
is one, and whose map it is), a filter by predicted class and a sort by confidence; a card opens
every map of its image (each class and method, captioned). ``#class=285`` in the
address pre-selects a class. Failed images are cards with their error; warnings about the
model (e.g. random weights) are a banner on top.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from urllib.parse import quote

from onnxcam.outputs import REPORT, write_text
from onnxcam.pixels import completeness_text

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1rem;background:#f6f6f6}
header{display:flex;gap:1rem;align-items:center;flex-wrap:wrap}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:.8rem;margin-top:1rem}
.card{background:#fff;border-radius:6px;padding:.4rem;box-shadow:0 1px 3px #0003;cursor:pointer}
.card img{width:100%;height:160px;object-fit:contain;background:#222}
.card .label{font-weight:600}.card.flagged{border:2px solid #e90}.card.error{border:2px solid #c33;cursor:default}
.card .path{font-size:.75rem;color:#555;word-break:break-all}.card .err{overflow-wrap:anywhere}
#modal{position:fixed;inset:0;background:#000c;display:none;align-items:center;justify-content:center;overflow:auto}
#modal.open{display:flex}#modal img{max-width:46vw;max-height:70vh;background:#fff}
#panel{display:flex;flex-wrap:wrap;gap:.5rem;justify-content:center}figure{margin:0}figcaption{color:#fff}
.card .shown{font-size:.8rem;color:#333}
#modal p{color:#fff}
#classes{border-collapse:collapse;margin-top:.5rem}#classes td,#classes th{border:1px solid #bbb;padding:.2rem .5rem}
.warning{background:#fde2b3;border:2px solid #e90;padding:.5rem;border-radius:6px;font-weight:600}
</style></head><body>
<header><h1>__TITLE__</h1><span id="count"></span>
<label>predicted class <select id="filter"><option value="">all</option></select></label>
<label>sort <select id="sort"><option value="desc">most confident first</option>
<option value="asc">least confident first</option><option value="path">by file</option></select></label>
</header>
<div id="warnings"></div>
<table id="classes"></table>
<div id="grid"></div>
<div id="modal"><div><div id="panel"></div><p id="caption"></p></div></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("data").textContent), items = data.items;
for (const text of data.warnings) {
  const p = document.createElement("p"); p.className = "warning"; p.textContent = text;
  document.getElementById("warnings").append(p);
}
if (data.table.length) {  // the audit's result: per class, accuracy and where the maps lie
  const table = document.getElementById("classes"), keys = Object.keys(data.table[0]);
  const head = document.createElement("tr");
  for (const k of keys) { const th = document.createElement("th"); th.textContent = k; head.append(th); }
  table.append(head);
  for (const row of data.table) {
    const tr = document.createElement("tr");
    for (const k of keys) { const td = document.createElement("td"); td.textContent = row[k]; tr.append(td); }
    table.append(tr);
  }
}
const grid = document.getElementById("grid"), filter = document.getElementById("filter");
const sort = document.getElementById("sort"), modal = document.getElementById("modal");
const classes = new Map();
for (const it of items) if (!it.error) classes.set(String(it.top.class), it.top.label);
for (const [c, label] of [...classes].sort((a, b) => a[1].localeCompare(b[1]))) {
  const o = document.createElement("option"); o.value = c; o.textContent = `${label} (${c})`; filter.append(o);
}
function card(it) {
  const d = document.createElement("div");
  d.className = "card" + (it.error ? " error" : "") + (it.flagged ? " flagged" : "");
  d.dataset.class = it.error ? "" : String(it.top.class);
  if (it.error) {
    d.innerHTML = `<div class="label">failed</div><div class="path"></div><div class="err"></div>`;
    d.querySelector(".err").textContent = it.error;
  } else {
    d.innerHTML = `<img loading="lazy" alt=""><div class="label"></div><div class="prob"></div>` +
      `<div class="shown"></div><div class="path"></div>`;
    d.querySelector("img").src = it.thumb;
    const more = it.full.length > 2 ? ` (+${it.full.length - 2} more)` : "";
    d.querySelector(".shown").textContent = it.thumbCaption + more;
    d.querySelector(".label").textContent = it.top.label + (it.truth ? ` (true: ${it.truth})` : "") +
      (it.flagged ? " (looks off the object)" : "");
    d.querySelector(".prob").textContent = (100 * it.top.probability).toFixed(1) + "%";
    d.addEventListener("click", () => open(it));
  }
  d.querySelector(".path").textContent = it.path;
  return d;
}
function open(it) {
  const panel = document.getElementById("panel"); panel.replaceChildren();
  it.full.forEach((src, i) => {
    const figure = document.createElement("figure"), im = document.createElement("img");
    const caption = document.createElement("figcaption");
    im.src = src; caption.textContent = it.captions[i]; figure.append(im, caption); panel.append(figure);
  });
  const percent = (100 * it.top.probability).toFixed(1);
  document.getElementById("caption").textContent = `${it.path}: ${it.top.label} ${percent}%`;
  modal.classList.add("open");
}
modal.addEventListener("click", () => modal.classList.remove("open"));
function render() {
  const order = [...items];
  const conf = it => it.error ? -1 : it.top.probability;
  if (sort.value === "desc") order.sort((a, b) => conf(b) - conf(a));
  if (sort.value === "asc") order.sort((a, b) => conf(a) - conf(b));
  if (sort.value === "path") order.sort((a, b) => a.path.localeCompare(b.path));
  order.sort((a, b) => Boolean(b.flagged) - Boolean(a.flagged));  // audit: looks off the object first
  grid.replaceChildren(...order.map(card));
  let shown = 0;
  for (const d of grid.children) {
    d.hidden = filter.value !== "" && d.dataset.class !== filter.value;
    shown += !d.hidden;
  }
  document.getElementById("count").textContent = `${shown} of ${items.length} images`;
}
const hash = new URLSearchParams(location.hash.slice(1));
if (hash.has("class")) filter.value = hash.get("class");
filter.addEventListener("change", render); sort.addEventListener("change", render);
render();
</script></body></html>
"""


def _items(records: list[dict], out: Path) -> list[dict]:
    """One entry per image: its top prediction, the first map's overlay, and the full-size views."""
    items: dict[str, dict] = {}
    # a URL relative to the report: # ? % escaped, a name's bytes that are not UTF-8 percent-encoded as they are
    rel = lambda p: quote(os.path.relpath(p, out).replace(os.sep, "/"), errors="surrogateescape")  # noqa: E731
    for r in records:
        if r.get("error"):
            items[r["path"]] = {"path": r["path"], "error": r["error"]}
            continue
        if r["path"] not in items:
            photo = rel(os.path.abspath(r["path"]))
            top = r["predictions"][0] if r["predictions"] else {"label": "no detection", "probability": 0.0}
            if "text" in r:  # a recogniser's: its text, and its confidence
                top = {"label": f"text {r['text']!r}", "probability": r.get("text_probability", 0.0)}
            items[r["path"]] = {"path": r["path"], "top": top, "maps": [], "full": [photo], "captions": ["the photo"],
                                "flagged": False}  # fmt: skip
        item = items[r["path"]]
        if r.get("target") is None:  # a detector's photo with no detection: the photo, said so
            continue
        target = r["target"]
        caption = (f"{target['method']} map of {target['label']} (value {target['probability']:.4g})" if "explains"
                   in target else f"{target['method']} map of {target['label']} ({100 * target['probability']:.1f}%)")
        if "completeness" in target:
            caption += f", completeness error {completeness_text(target['completeness'])}"
        item["maps"].append({"src": rel(r["overlay"]), "caption": caption, "class": target["class"]})
        item["full"].append(rel(r["panel"]) if r.get("panel") else rel(r["overlay"]))
        item["captions"].append(caption)
        item["flagged"] = item["flagged"] or bool(r.get("flagged"))
        if "true_class" in r:  # an audit's image: its class, and how much of the map lies on its box
            item["truth"] = f"{r['true_class']}, {100 * r['object_share']:.0f}% of the map on its box"
    for item in items.values():  # the card shows the map of the predicted class where there is one, and says whose
        maps = item.pop("maps", None)
        if maps is not None:
            shown = next((m for m in maps if m["class"] == item["top"].get("class")), maps[0] if maps else None)
            item["thumb"], item["thumbCaption"] = (shown["src"], shown["caption"]) if shown else (item["full"][0], "")
    return list(items.values())


def script_json(value: object) -> str:
    """JSON that is inert inside an HTML ``<script>`` block: ``<``, ``>`` and ``&`` as ``\\uXXXX`` escapes."""
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_report(
    records: list[dict], out: Path, warnings: list[str] | None = None, title: str = "onnxcam explain",
    table: list[dict] | None = None,
) -> Path:  # fmt: skip
    """Write ``out/index.html`` for ``records`` (as in ``results.jsonl``), with ``warnings`` on top and ``table``
    (rows of one kind, such as the audit's classes) above the cards."""
    data = {"items": _items(records, out), "warnings": list(warnings or []), "table": list(table or [])}
    path = out / REPORT
    page = PAGE.replace("__TITLE__", html.escape(title))
    write_text(path, page.replace("__DATA__", script_json(data)))
    return path
