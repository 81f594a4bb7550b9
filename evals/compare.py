"""`python -m vllm_lite.evals.compare A.json B.json`: do two eval reports (gsm8k.json or mrcr.json, e.g. without and
with speculative decoding) hold the same answers? Greedy decoding with an exact speculative method must give the
same text for every question; this prints how many responses are identical, and the first that differ."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per-record comparison of two reports of the same eval over the same questions."""
    ra, rb = a["records"], b["records"]
    if len(ra) != len(rb):
        raise ValueError(f"the reports hold {len(ra)} and {len(rb)} records")
    differ = [x["index"] for x, y in zip(ra, rb) if x["response"] != y["response"]]
    out = {"records": len(ra), "identical_responses": len(ra) - len(differ), "differing_indices": differ}
    for key in ("accuracy", "mean_score", "wall_s"):
        if key in a["summary"]:
            out[key] = [a["summary"][key], b["summary"][key]]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_lite.evals.compare", description=__doc__)
    p.add_argument("a", help="first report JSON")
    p.add_argument("b", help="second report JSON")
    args = p.parse_args(argv)
    with open(args.a) as fa, open(args.b) as fb:
        result = compare(json.load(fa), json.load(fb))
    print(json.dumps(result))
    return 0 if not result["differing_indices"] else 1


if __name__ == "__main__":
    sys.exit(main())
