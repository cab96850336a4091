"""Import the published study's logs into a campaign directory that `load_campaign` and the report read.

    lrpilot import-logs /work/shared/seed-experiments --dir runs/published

The published layout is three jsonl files joined by `run_start_iso` (final_results_log_<tag>.jsonl,
decisions_log_<tag>.jsonl, rollback_log_<tag>.jsonl) plus cosine_baselines/*.json, whose peak LR is only in
the file name. The import adds what our layout has and theirs lacks -- `round` (1.. in line order),
`controller: "llm"` and `status` on rounds, `round` on decisions and rollbacks, `schedule` and `peak_lr` on
baselines -- and copies every other field verbatim. Records that already carry one of these fields keep it.

Importing the same logs again is a no-op; a destination that holds any other campaign is refused. Each file
is written whole and renamed into place, so an interrupted import leaves only complete files, and running
it again completes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lrpilot.campaign_logs import peak_from_filename
from lrpilot.errors import LrpilotError, writing
from lrpilot.logs import as_float, dumps, iter_jsonl, write_atomic
from lrpilot.records import BaselineResult, DecisionRecord, FinalResult, RecordError, RollbackRecord

#: the campaign files an import writes, or finds in a destination that already holds a campaign
CAMPAIGN_LOGS = ("final_results.jsonl", "decisions.jsonl", "rollbacks.jsonl", "llm_calls.jsonl", "briefs.jsonl")


class LogImportError(LrpilotError, ValueError):
    """The source or destination of an import cannot be used (the message names what and the fix)."""


@dataclass(frozen=True)
class ImportSummary:
    """What an import holds: counts of rounds, decisions, rollbacks and baselines written (or found)."""

    rounds: int
    decisions: int
    rollbacks: int
    baselines: int
    dest: str = ""
    #: True when the destination already held exactly this import and nothing was written
    already: bool = False
    #: decisions/rollbacks whose run_start_iso matches no round (kept, without `round`)
    unjoined: int = 0


def _published_files(src: Path, tag: str | None) -> tuple[str, dict[str, Path | None]]:
    if not src.is_dir():
        raise LogImportError(f"import-logs: source {src}: no such directory")
    tags = sorted(p.name[len("final_results_log_") : -len(".jsonl")] for p in src.glob("final_results_log_*.jsonl"))
    if tag is None:
        if not tags:
            raise LogImportError(
                f"import-logs: source {src} has no final_results_log_*.jsonl (the published layout: "
                "final_results_log_<tag>.jsonl, decisions_log_<tag>.jsonl, rollback_log_<tag>.jsonl, cosine_baselines/)"
            )
        if len(tags) > 1:
            raise LogImportError(
                f"import-logs: source {src} holds several campaigns ({', '.join(tags)}); pick one with --tag {tags[0]}"
            )
        tag = tags[0]
    elif tags and tag not in tags:
        raise LogImportError(f"import-logs: source {src} has no campaign {tag!r}; --tag one of {', '.join(tags)}")
    files: dict[str, Path | None] = {
        "final_results": src / f"final_results_log_{tag}.jsonl",
        "decisions": src / f"decisions_log_{tag}.jsonl",
        "rollbacks": src / f"rollback_log_{tag}.jsonl",
    }
    missing = [p.name for k, p in files.items() if k != "rollbacks" and p is not None and not p.is_file()]
    if missing:
        raise LogImportError(f"import-logs: source {src} is missing {', '.join(missing)}")
    if files["rollbacks"] is not None and not files["rollbacks"].is_file():
        files["rollbacks"] = None  # a campaign without crashes never wrote one
    return tag, files


def _jsonl_bytes(records: list[dict[str, Any]]) -> bytes:
    return "".join(dumps(r) + "\n" for r in records).encode("utf-8")


def _with(rec: dict[str, Any], first: dict[str, Any] | None = None, last: dict[str, Any] | None = None) -> dict:
    """rec with fields added (before or after its own ones) unless rec already has them."""
    out = {k: v for k, v in (first or {}).items() if k not in rec}
    out.update(rec)
    out.update({k: v for k, v in (last or {}).items() if k not in rec})
    return out


#: fields every record of a published log holds (one of a tuple's names is enough); a file named like the
#: published layout whose records lack them is some other JSON and is refused rather than imported as failed rounds
#: the record of each published log (lrpilot.records)
_TYPES = {
    "final_results": FinalResult,
    "decisions": DecisionRecord,
    "rollbacks": RollbackRecord,
    "baseline": BaselineResult,
}
REQUIRED = {
    "final_results": ("run_start_iso", ("final_eval_ppl", "final_eval_loss")),
    "decisions": ("run_start_iso", "step", "new_lr"),
    "rollbacks": ("run_start_iso", "crash_step"),
    "baseline": (("final_eval_ppl", "final_eval_loss"),),
}


def _check_fields(rec: dict[str, Any], kind: str, where: str) -> None:
    for need in REQUIRED[kind]:
        names = need if isinstance(need, tuple) else (need,)
        if not any(n in rec for n in names):
            raise LogImportError(
                f"import-logs: {where} has no {' or '.join(names)} field, so it is not the published study's "
                f"{kind.replace('_', ' ')} log; check the source directory (nothing imported)"
            )
    try:  # the published fields' types (lrpilot.records); a field that is there but not even a number is refused
        _TYPES[kind].from_dict(rec)
    except RecordError as e:
        if e.problem != "is missing":  # the published logs lack lrpilot's own fields (a rollback's lr_at_crash, ...)
            raise LogImportError(
                f"import-logs: {where}: field {e.field!r} {e.problem}; fix the line (nothing imported)"
            ) from None
    for name in ("final_eval_ppl", "final_eval_loss"):  # a NaN/inf is a failed run; a negative one is impossible
        v = as_float(rec.get(name, math.nan))
        low = 1.0 if name == "final_eval_ppl" else 0.0  # ppl = exp(cross-entropy in nats) >= exp(0)
        if math.isfinite(v) and v < low:
            raise LogImportError(
                f"import-logs: {where}: field {name!r} is {v:g}, below {low:g} (a perplexity is exp of a loss >= 0); "
                "fix the line (nothing imported)"
            )


def _read_log(path: Path, kind: str) -> list[dict[str, Any]]:
    """Every record of one published log, each checked for the published fields; a corrupt line is refused."""
    out = []
    try:
        for n, rec in enumerate(iter_jsonl(path, strict=True), 1):
            _check_fields(rec, kind, f"{path} record {n}")
            out.append(rec)
    except LogImportError:
        raise  # already one line naming the record (a ValueError too, so not wrapped a second time)
    except ValueError as e:  # iter_jsonl names the file and line
        raise LogImportError(f"import-logs: {e}; fix or remove the line (nothing imported)") from None
    if kind == "final_results" and not out:
        raise LogImportError(f"import-logs: {path} holds no results; nothing to import")
    return out


def _build(src: Path, tag: str | None) -> tuple[dict[str, bytes], ImportSummary, dict[str, Any]]:
    """Every file the import writes (relative path -> bytes), its summary and its provenance record."""
    tag, files = _published_files(src, tag)
    finals = _read_log(files["final_results"], "final_results")
    decisions = _read_log(files["decisions"], "decisions")
    rollbacks = _read_log(files["rollbacks"], "rollbacks") if files["rollbacks"] else []
    rounds, by_iso = [], {}
    for n, rec in enumerate(finals, 1):
        status = "ok" if math.isfinite(as_float(rec.get("final_eval_ppl"))) else "failed"
        rounds.append(_with(rec, first={"round": n}, last={"controller": "llm", "status": status}))
        by_iso.setdefault(rec.get("run_start_iso"), rounds[-1].get("round", n))
    unjoined = 0

    def numbered(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal unjoined
        out = []
        for rec in recs:
            n = by_iso.get(rec.get("run_start_iso"))
            unjoined += n is None
            out.append(rec if n is None else _with(rec, first={"round": n}))
        return out

    out = {
        "final_results.jsonl": _jsonl_bytes(rounds),
        "decisions.jsonl": _jsonl_bytes(numbered(decisions)),
        "rollbacks.jsonl": _jsonl_bytes(numbered(rollbacks)),
    }
    if unjoined:
        warnings.warn(
            f"import-logs: {unjoined} decision/rollback records match no round; kept without 'round'", stacklevel=3
        )
    n_base = 0
    base_dir = src / "cosine_baselines"
    for p in sorted(base_dir.glob("*.json")) if base_dir.is_dir() else []:
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LogImportError(
                f"import-logs: baseline {p}: not valid JSON ({e.__class__.__name__}); fix or remove it"
            ) from e
        if not isinstance(rec, dict):
            raise LogImportError(f"import-logs: baseline {p}: not a JSON object; fix or remove it")
        _check_fields(rec, "baseline", f"baseline {p}")
        peak = as_float(rec.get("peak_lr"))
        if not math.isfinite(peak):
            peak = peak_from_filename(p.name)
        if not math.isfinite(peak):
            raise LogImportError(
                f"import-logs: baseline {p.name}: no peak LR in the file name (expected cosine_lr<peak>_....json)"
            )
        rec = _with(rec, last={"schedule": "cosine", "peak_lr": peak})
        out[f"baselines/{p.name}"] = (dumps(rec, indent=2) + "\n").encode()  # a diverged run's inf ppl as "inf"
        n_base += 1
    sources = [f for f in files.values() if f is not None]
    sources += sorted(base_dir.glob("*.json")) if base_dir.is_dir() else []
    provenance = {
        "imported_from": str(src.resolve()),
        "tag": tag,
        "sha256": {str(f.relative_to(src)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sources},
    }
    summary = ImportSummary(
        rounds=len(rounds),
        decisions=len(decisions),
        rollbacks=len(rollbacks),
        baselines=n_base,
        unjoined=unjoined,
    )
    return out, summary, provenance


def _existing_campaign_files(dest: Path) -> list[str]:
    found = [name for name in (*CAMPAIGN_LOGS, "campaign.json") if (dest / name).exists()]
    if (dest / "baselines").is_dir():
        found += [f"baselines/{p.name}" for p in sorted((dest / "baselines").glob("*.json"))]
    return found


def import_published(src_dir: str | Path, dest_dir: str | Path, tag: str | None = None) -> ImportSummary:
    """Turn the published logs in `src_dir` into a campaign directory `dest_dir` (see the module docstring).
    `tag` picks one campaign when the source holds several (final_results_log_<tag>.jsonl). Raises
    LogImportError (one line) for a missing source or files, or a destination holding another campaign."""
    src, dest = Path(src_dir), Path(dest_dir)
    files, summary, provenance = _build(src, tag)
    if dest.exists() and not dest.is_dir():
        raise LogImportError(f"import-logs: destination {dest} is a file; pass a directory")
    existing = _existing_campaign_files(dest) if dest.is_dir() else []
    foreign = [name for name in existing if name not in files or (dest / name).read_bytes() != files[name]]
    if foreign:
        rounds = sum(1 for _ in iter_jsonl(dest / "final_results.jsonl"))
        raise LogImportError(
            f"import-logs: destination {dest} already holds a different campaign ({rounds} rounds; "
            f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); import into an empty directory"
        )
    todo = [name for name in files if name not in existing]
    if not todo:
        return replace(summary, dest=str(dest), already=True)
    from lrpilot.campaign import CampaignLock

    # the destination is a campaign directory: no campaign (or second import) may write it meanwhile
    with CampaignLock(dest):
        # final_results.jsonl last: until it exists the destination is not a readable campaign
        for name in sorted(todo, key=lambda n: n == "final_results.jsonl"):
            with writing(dest / name):
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(dest / name, files[name], fsync=True)
        counts = {k: getattr(summary, k) for k in ("rounds", "decisions", "rollbacks", "baselines")}
        write_atomic(
            dest / "import.json", (json.dumps({**provenance, "counts": counts}, indent=2) + "\n").encode(), fsync=True
        )
    return replace(summary, dest=str(dest))


def main_import(src: str | Path, dest: str | Path, tag: str | None = None) -> int:
    """`lrpilot import-logs SRC --dir DEST`: import and print a one-line summary; 0 on success, 2 on error."""
    try:
        s = import_published(src, dest, tag=tag)
    except LogImportError as e:
        print(f"lrpilot {e}", file=sys.stderr)
        return 2
    what = f"{s.rounds} rounds, {s.decisions} decisions, {s.rollbacks} rollbacks, {s.baselines} baselines"
    if s.already:
        print(f"already imported: {dest} holds {what} from {src} (nothing written)")
    else:
        print(f"imported {what} from {src} into {dest}")
    return 0
