"""What changed between two data audits (results/<run>/audit.json): documents and bytes out per
source, tokens per split, and the residual-junk shares of the new one, as Markdown tables.

  python scripts/audit_diff.py OLD_AUDIT.json results/data/audit.json   # e.g. OLD from `git show REV:...`
"""
import argparse
import json
from pathlib import Path


def _pct(new, old):
    return f"{100 * (new - old) / old:+.1f}%" if old else "new"


def diff(old: dict, new: dict) -> str:
    out = ["| source | docs out (old → new) | Δ docs | MB out (old → new) | Δ bytes | kept docs | max residual |",
           "|---|---|---|---|---|---|---|"]
    for s, v in new["sources"].items():
        o = old["sources"].get(s, {"docs_out": 0, "bytes_out": 0})
        res = v.get("residual", {})
        worst = max(res.items(), key=lambda kv: kv[1]) if res else ("", 0.0)
        out.append(f"| {s} | {o['docs_out']:,} → {v['docs_out']:,} | {_pct(v['docs_out'], o['docs_out'])} | "
                   f"{o['bytes_out'] / 1e6:.2f} → {v['bytes_out'] / 1e6:.2f} | "
                   f"{_pct(v['bytes_out'], o['bytes_out'])} | "
                   f"{100 * v['docs_out'] / max(v['docs_in'], 1):.1f}% | "
                   f"{f'{worst[1]:.4f} {worst[0]}' if worst[1] else '0'} |")
    to, tn = old["totals"], new["totals"]
    out.append(f"| TOTAL | {to['docs_out']:,} → {tn['docs_out']:,} | {_pct(tn['docs_out'], to['docs_out'])} | "
               f"{to['bytes_out'] / 1e6:.1f} → {tn['bytes_out'] / 1e6:.1f} | "
               f"{_pct(tn['bytes_out'], to['bytes_out'])} | "
               f"{100 * tn['docs_out'] / max(tn['docs_in'], 1):.1f}% | |")
    out += ["", "| split | docs (old → new) | tokens (old → new) | Δ tokens |", "|---|---|---|---|"]
    for sp, v in new["splits"].items():
        o = old["splits"].get(sp, {})
        ot, nt = old.get("tokens", {}).get(sp, 0), new.get("tokens", {}).get(sp, 0)
        out.append(f"| {sp} | {o.get('docs', 0):,} → {v['docs']:,} | {ot:,} → {nt:,} | {_pct(nt, ot)} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    a = ap.parse_args(argv)
    print(diff(json.loads(a.old.read_text()), json.loads(a.new.read_text())))


if __name__ == "__main__":
    main()
