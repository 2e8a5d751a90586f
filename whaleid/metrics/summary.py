"""evaluate's metrics.json as the lines `whaleid evaluate` prints: open-set MAP@5 at the thresholds,
what re-ranking buys, verification and one-shot accuracy."""
from __future__ import annotations


def summary_lines(m: dict) -> list[str]:
    out = []
    out.append(f"open-set validation ({m['images']} images, {m['new_whale_share']:.0%} new whales, "
               f"merge {m['merge']}, tta {m['tta']}):")
    out.append(f"  MAP@5 {m['map5']:.4f}  top-1 {m['top1']:.4f}  at threshold {m['threshold']:.3f}")
    out.append(f"  all-new_whale baseline MAP@5 {m['all_new_whale_map5']:.4f}")
    out.append(f"  best threshold {m['best_threshold']:.2f}: MAP@5 {m['best_map5']:.4f}")
    if "share_map5" in m:
        out.append(f"  threshold {m['share_threshold']:.3f} by share ({m['share']:.0%} new_whale first): "
                   f"MAP@5 {m['share_map5']:.4f}")
    if "summary" in (m.get("rerank") or {}):  # what re-ranking buys (similarity/local.py)
        out.append(m["rerank"]["summary"])
    v = m.get("verification") or {}
    if v.get("auc") is not None:
        b = v["at_best_threshold"]
        out.append(f"  verification ({v['pairs']} query-id pairs): AUC {v['auc']:.4f}; at threshold {b['threshold']:.2f} "
                   f"precision {b['precision']:.4f} recall {b['recall']:.4f} F1 {b['f1']:.4f}")
    o = m.get("one_shot")
    if o:
        acc = "n/a" if o["accuracy"] is None else f"{o['accuracy']:.4f}"
        unseen = "" if o["unseen_accuracy"] is None else f"; held-out ids {o['unseen_accuracy']:.4f} ({o['unseen_tasks']} tasks)"
        out.append(f"  {o['n_way']}-way one-shot accuracy {acc} ({o['tasks']} tasks{unseen})")
    return out
