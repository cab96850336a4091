"""The LLM Controller: every `decision_every` steps an LLM reads the run's telemetry and sets the LR.

    python -c "from lrpilot.controllers.llm import LLMController; from lrpilot.llm.local_backend import \
LocalBackend; print(LLMController(LocalBackend()).describe())"

The prompt holds only the run's own facts: progress, the LR now, the guard's limits, the loss per decision
interval, a dense sample of the latest interval, the computed trend, this round's decisions (with the loss
effect of the last one), rollbacks and emergency cuts, and the Memory agent's brief. It names no schedule
family and suggests no value: whatever the agent does must come from the numbers.

The reply is untrusted. `parse_reply` accepts exactly one JSON object with a finite positive `lr`, after the
model's reasoning blocks (`<think>...</think>`) are removed; any
failure (backend error, timeout, garbage) keeps the current LR with `fallback=True` and the raw reply kept
for the log. The guard clamps the LR afterwards; this module does not second-guess it. blocking=False:
training continues while the model thinks.

When the guard allows it (`Observation.rollback_steps`), the prompt lists the checkpoints the agent may name
and the reply may carry `"rollback_to_step": <step>` (`parse_rollback`): the supervisor then rolls the run
back to that checkpoint and continues at the reply's LR, after the guard validated the request.
"""

from __future__ import annotations

import math
import re
from typing import Any

from lrpilot.config import GuardConfig
from lrpilot.controllers.base import BaseController, ControllerContext, ControllerSpec, Decision, Observation
from lrpilot.controllers.rules import RuleParams, loss_change_z, range_suggestion
from lrpilot.llm.base import LLMBackend, make_backend, parse_json_object, split_reasoning
from lrpilot.logs import finite_mean
from lrpilot.lr import fmt_lr, is_positive_finite
from lrpilot.records import Kind

#: the reason asked for is short: a grammar-constrained small model otherwise rambles to max_tokens (and a
#: cut-off reply has no lr); endpoints that refuse maxLength make the backend step down to json_object
REASON_MAX_CHARS = 300
#: the reply we ask for; `reason` comes first so that a model writing left to right reasons before it commits
REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"reason": {"type": "string", "maxLength": REASON_MAX_CHARS}, "lr": {"type": "number"}},
    "required": ["reason", "lr"],
    "additionalProperties": False,
}

#: the same, when the agent may ask to roll back (Observation.rollback_steps not empty)
REPLY_SCHEMA_WITH_ROLLBACK: dict[str, Any] = {
    **REPLY_SCHEMA,
    "properties": {**REPLY_SCHEMA["properties"], "rollback_to_step": {"type": ["integer", "null"]}},
}

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
MAX_REASON_CHARS = 2000


def parse_reply(text: str) -> tuple[float | None, str, str | None]:
    """(lr, reason, error) from a reply that should be {"lr": number, "reason": string}. lr may be a JSON
    number or a numeric string ("3e-4"); it must be finite and > 0. On any problem lr is None and error
    says what was wrong. Never evaluates anything."""
    try:
        obj = parse_json_object(text)
    except ValueError as e:
        return None, "", str(e)
    reason_raw = obj.get("reason", "")
    reason = reason_raw if isinstance(reason_raw, str) else ""
    reason = " ".join(reason.split())[:MAX_REASON_CHARS]
    if "lr" not in obj:
        return None, reason, f"no 'lr' field (keys: {sorted(obj)[:5]})"
    lr, err = _check_lr(obj["lr"], "'lr'")
    return lr, reason, err


def parse_rollback(text: str) -> tuple[int | None, str | None]:
    """(rollback_to_step, error) from a reply's optional "rollback_to_step": absent or null -> (None, None);
    a non-negative integer (a JSON integer, an integral float, or such a numeric string) -> (step, None);
    anything else -> (None, what was wrong). Whether the step is allowed is the guard's call."""
    try:
        obj = parse_json_object(text)
    except ValueError:
        return None, None  # parse_reply reports the broken reply
    v = obj.get("rollback_to_step")
    if v is None:
        return None, None
    if isinstance(v, str) and _NUMBER.fullmatch(v.strip()):
        v = float(v.strip())
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v != int(v):
        return None, f"'rollback_to_step' must be a non-negative integer step, got {str(v)[:40]!r}"
    return int(v), None


#: the published study's replies: free text that ends in "[FINAL_LR] 3.0e-4 [/FINAL_LR]"
_FINAL_LR = re.compile(r"\[FINAL_LR\]([^\[\]]*)\[/FINAL_LR\]")


def parse_recorded_reply(text: str) -> tuple[float | None, str, str | None]:
    """parse_reply for logged replies, which come in two formats: ours (the JSON object) and the published
    study's free text ending in `[FINAL_LR] x [/FINAL_LR]` (the last tag counts; the text before it is the
    reason). The number gets the same checks. Used by replay (`rerun_raw`), never for a live agent: the
    Controller's own replies must be JSON."""
    if isinstance(text, str):
        text = split_reasoning(text)[0]  # a tag inside the model's reasoning is not its answer
    tags = _FINAL_LR.findall(text) if isinstance(text, str) else []
    if not tags:
        return parse_reply(text)
    reason = " ".join(text[: text.rfind("[FINAL_LR]")].split())[:MAX_REASON_CHARS]
    lr, err = _check_lr(tags[-1].strip(), "[FINAL_LR]")
    return lr, reason, err


def _check_lr(v: Any, name: str) -> tuple[float | None, str | None]:
    """A proposed LR as a finite positive float (a JSON number or a numeric string), or the error."""
    if isinstance(v, bool):
        return None, f"{name} is a boolean ({v}), not a number"
    if isinstance(v, (int, float)):
        lr = float(v)
    elif isinstance(v, str):
        s = v.strip()
        if not _NUMBER.fullmatch(s):
            return None, f"{name} is not a number: {v[:40]!r}"
        lr = float(s)
    else:
        return None, f"{name} is a {type(v).__name__}, not a number"
    if not math.isfinite(lr):
        return None, f"{name} is not finite ({v!r})"
    if lr <= 0:
        return None, f"{name} must be > 0, got {lr:g}"
    return lr, None


def _lr(x: float) -> str:
    """Compact LR: 0.0024 -> "2.4e-3" (fewer tokens than "2.40e-03"; small models read digits one by one)."""
    if not math.isfinite(x):
        return str(x)
    return fmt_lr(x) if x > 0 else f"{x:g}"


def _loss(x: float) -> str:
    return f"{x:.3f}"  # non-finite: nan, inf, -inf


def _finite(xs: Any) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]


def _slope(ys: list[float]) -> float:
    """Least-squares slope of ys against their index (per step for dense losses)."""
    n = len(ys)
    if n < 2:
        return math.nan
    mx = (n - 1) / 2
    my = sum(ys) / n
    den = sum((i - mx) ** 2 for i in range(n))
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / den


def _word(change: float, level: float) -> str:
    if not math.isfinite(change):
        return "unknown"
    tol = 0.005 * abs(level) if math.isfinite(level) and level else 1e-3
    return "falling" if change < -tol else "rising" if change > tol else "flat"


class LLMController(BaseController):
    """Asks an LLM backend for the LR at each decision point; a bad or missing reply keeps the current LR."""

    name = "llm"
    blocking = False

    def __init__(
        self,
        backend: LLMBackend,
        guard: GuardConfig | None = None,
        dense_samples: int = 12,
        max_history: int = 30,
        max_decisions: int = 10,
        blocking: bool = False,
        range_steps: int = 0,
    ) -> None:
        self.backend = backend
        self.blocking = blocking
        #: updates of the LR range test at the end of warmup (0: none; only a blocking controller gets one)
        self.range_steps = range_steps
        #: asked for this round's range test already (once per round; a refused test then goes to the model)
        self._range_asked = False
        self.guard = guard
        self.dense_samples = dense_samples
        self.max_history = max_history
        self.max_decisions = max_decisions
        self.memory_brief = ""

    def start_round(self, round_index: int = 0, memory_brief: str = "") -> None:
        self.memory_brief = memory_brief
        self._range_asked = False

    def describe(self) -> dict[str, Any]:
        return {"controller": self.name, **self.backend.describe()}

    # ---------------------------------------------------------------------------------- prompt

    def build_prompt(self, obs: Observation) -> list[dict]:
        """System + user messages built from the run's own telemetry only. What changes least comes first
        (rules, brief, the interval table that only grows), so consecutive prompts share a long prefix and
        a local model re-evaluates only the new tail (llama.cpp reuses the common prefix of its KV cache)."""
        system = (
            "You are the learning-rate controller of a language-model pre-training run. Every "
            f"{obs.decision_every} optimizer steps you read the run's telemetry and choose the learning rate "
            f"for the next steps. The goal is the lowest evaluation loss at the final step ({obs.total_steps}). "
            "Base your choice only on the numbers given. Reply with one JSON object and nothing else: "
            '{"reason": "<at most three sentences>", "lr": <positive number>}. '
            'lr is a learning rate on the same scale as "current LR", never a loss value.'
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": self._facts(obs)}]

    def _facts(self, obs: Observation) -> str:
        g = self.guard
        floor = g.floor if g else obs.floor
        ceiling = g.ceiling if g else obs.ceiling
        lo_ratio = g.min_ratio if g else obs.min_ratio
        hi_ratio = g.max_ratio if g else obs.max_ratio
        out: list[str] = ["## Rules (enforced by code on your answer)"]
        out.append(
            f"Your LR is clamped to [{lo_ratio:g} x, {hi_ratio:g} x] the current LR and to "
            f"[{_lr(floor)}, {_lr(ceiling)}]."
        )
        if obs.lower_only:
            out.append(
                "The optimizer is schedule-free AdamW, whose weight averaging follows the largest LR so far: "
                "you may only keep or lower the LR; a higher LR is replaced by the current one."
            )
        if g is not None:
            out.append(
                f"Emergency cut (LR x {g.emergency_factor:g}) if the loss rises by more than {g.emergency_jump:g} "
                f"over one interval or exceeds {g.emergency_loss:g}. A NaN/Inf loss or a loss above "
                f"{g.crash_loss:g} is a crash: the run rolls back >= {g.rollback_back_steps} steps and the LR is "
                f"multiplied by {g.crash_lr_factor:g}."
            )

        brief = (obs.memory_brief or self.memory_brief).strip()
        out.append("\n## Memory brief (from earlier rounds of this campaign)")
        out.append(brief or "none (first round)")

        hist = list(obs.loss_history)
        out.append("\n## This round: mean loss per decision interval (step: loss @ LR in force during it)")
        out.extend(self._table(obs, hist))

        out.append("\n## Now")
        out.append(
            f"step {obs.step} of {obs.total_steps} ({100.0 * obs.progress:.1f}% done, {obs.steps_left} steps "
            f"left); warmup was {obs.warmup_steps} steps up to {_lr(obs.init_lr)}; you decide every "
            f"{obs.decision_every} steps and training continues while you think."
        )
        lr = obs.lr
        if is_positive_finite(lr):
            lo, hi = max(floor, lo_ratio * lr), min(ceiling, hi_ratio * lr)
            hi = min(hi, lr) if obs.lower_only else hi
            out.append(f"current LR: {_lr(lr)} (you may set {_lr(lo)} .. {_lr(hi)})")
        else:
            out.append(f"current LR: {_lr(lr)}")
        if math.isfinite(obs.grad_norm):
            out.append(f"gradient norm: {obs.grad_norm:.3g}")

        dense = list(obs.recent_losses)
        if dense:
            k = min(self.dense_samples, len(dense))
            idx = sorted({round(i * (len(dense) - 1) / max(1, k - 1)) for i in range(k)})
            out.append(
                f"latest interval, {len(dense)} per-step losses, sampled oldest first: "
                + ", ".join(_loss(dense[i]) for i in idx)
            )
            fin = _finite(dense)
            bad = len(dense) - len(fin)
            if fin:
                mean = sum(fin) / len(fin)
                std = math.sqrt(sum((x - mean) ** 2 for x in fin) / len(fin))
                out.append(
                    f"mean {_loss(mean)}, min {_loss(min(fin))}, max {_loss(max(fin))}, std {std:.3f}"
                    + (f", {bad} non-finite" if bad else "")
                )
            elif bad:
                out.append(f"all {bad} losses are non-finite")
            prev = next((v for st, v in reversed(obs.loss_history) if st < obs.step and math.isfinite(v)), math.nan)
            z, sigma, basis = loss_change_z(fin, prev)
            if math.isfinite(sigma):  # the rule controller's evidence (lrpilot.controllers.rules), same numbers
                out.append(
                    f"noise: per-step std around the interval's trend line {sigma:.4f}; the loss fell by "
                    f"{z:+.3g} standard errors of that noise ({basis})"
                )
        else:
            out.append("latest interval: no losses")
        if obs.probes and obs.probes[0].lrs:
            out.append(self._range_test(obs))
        elif obs.probes:
            out.append(
                f"lookahead probe at this step: from the current state the trainer trained {len(obs.probes[0].losses)} "
                "updates at each LR on the run's next batches, measured the loss on the batches after them, and "
                "restored the state (your LR still applies from this step): "
                + "; ".join(
                    f"LR {_lr(r.lr)} -> loss {_loss(r.end_loss)} (per-step {_loss(finite_mean(r.losses))} mean)"
                    for r in obs.probes
                )
            )

        out.append("trend: " + "; ".join(self._trend(hist, dense)))
        out.append(self._decisions(obs))
        if any(d.kind != Kind.EMERGENCY for d in obs.decisions):
            out.append(self._last_effect(obs, hist))

        events = []
        for r in obs.rollbacks:
            if r.crash_reason == "agent_request":
                events.append(
                    f"at step {r.crash_step} you rolled back to step {r.rolled_back_to_step}, LR {_lr(r.new_lr)}"
                )
                continue
            events.append(
                f"crash at step {r.crash_step} (LR {_lr(r.lr_at_crash)}, {r.crash_reason}): rolled back to step "
                f"{r.rolled_back_to_step}, LR set to {_lr(r.new_lr)}"
            )
        for d in obs.decisions:
            if d.kind == Kind.EMERGENCY:
                events.append(
                    f"emergency cut at step {d.step}: {_lr(d.old_lr)} -> {_lr(d.new_lr)} (loss {_loss(d.loss)})"
                )
        out.append("rollbacks and emergency cuts this round: " + ("; ".join(events) if events else "none"))
        if obs.rollback_steps:
            out.append(
                "you may go back to an earlier checkpoint if you judge the steps since then wasted: add "
                f'"rollback_to_step": <one of {", ".join(map(str, obs.rollback_steps))}> and the run continues '
                f"from that step at your lr ({obs.agent_rollbacks_left} such rollbacks left this round)"
            )
            out.append('\nAnswer with the JSON object {"reason": ..., "lr": ..., "rollback_to_step": ...} only '
                       "(rollback_to_step null unless you want to go back).")  # fmt: skip
        else:
            out.append('\nAnswer with the JSON object {"reason": ..., "lr": ...} only.')
        return "\n".join(out)

    def _table(self, obs: Observation, hist: list[tuple[int, float]]) -> list[str]:
        """One row per decision interval: its mean loss and the LR in force during it (so each decision shows
        as the LR of the next row). Rows are only ever appended, which keeps the prompt prefix stable."""
        if not hist:
            return ["none yet"]
        lr_at = dict(obs.lr_history)
        rows = []
        if len(hist) > self.max_history:
            old = hist[: len(hist) - self.max_history]
            rows.append(
                f"({len(old)} earlier intervals, steps {old[0][0]}-{old[-1][0]}: loss {_loss(old[0][1])} "
                f"-> {_loss(old[-1][1])})"
            )
        for s, v in hist[-self.max_history :]:
            rows.append(f"{s}: {_loss(v)} @ {_lr(lr_at[s])}" if s in lr_at else f"{s}: {_loss(v)}")
        return rows

    def _decisions(self, obs: Observation) -> str:
        own = [d for d in obs.decisions if d.kind != Kind.EMERGENCY]
        if not own:
            return "your decisions this round: none yet"
        changed = [d for d in own if d.kind == Kind.DECISION and d.new_lr != d.old_lr]
        kept = [d for d in own if d.kind == Kind.DECISION and d.new_lr == d.old_lr]
        fb = [d.step for d in own if d.kind == Kind.FALLBACK]
        parts = [f"changed the LR {len(changed)} times", f"kept it {len(kept)} times"]
        if fb:
            parts.append(f"no valid answer (LR kept) at steps {', '.join(map(str, fb[-5:]))}")
        return f"your decisions this round: {len(own)} ({'; '.join(parts)})"

    def _trend(self, hist: list[tuple[int, float]], dense: list[float]) -> list[str]:
        parts = []
        vals = [v for _, v in hist if math.isfinite(v)]
        if len(vals) >= 2:
            d1 = vals[-1] - vals[-2]
            parts.append(f"last interval vs previous {d1:+.3f} ({100 * d1 / vals[-2]:+.1f}%, {_word(d1, vals[-2])})")
        if len(vals) >= 4:
            d3 = vals[-1] - vals[-4]
            parts.append(f"over 3 intervals {d3:+.3f} ({100 * d3 / vals[-4]:+.1f}%, {_word(d3, vals[-4])})")
        fin = _finite(dense)
        if len(fin) >= 4:
            change = _slope(fin) * len(fin)
            parts.append(f"within the latest interval {change:+.3f} ({_word(change, sum(fin) / len(fin))})")
        if vals:
            parts.append(f"lowest interval loss {_loss(min(vals))}")
        return parts or ["not enough data yet"]

    def _last_effect(self, obs: Observation, hist: list[tuple[int, float]]) -> str:
        d = [x for x in obs.decisions if x.kind != Kind.EMERGENCY][-1]
        start = d.effective_step if d.effective_step is not None else d.step
        head = f"last decision: step {d.step}, {_lr(d.old_lr)} -> {_lr(d.new_lr)}"
        head += f", in force from step {d.effective_step}" if d.effective_step is not None else ", not applied yet"
        after = _finite(v for s, v in hist if s > start)
        if d.effective_step is None or not after or not math.isfinite(d.loss):
            return head + "; its effect is not measurable yet"
        a = sum(after) / len(after)
        return f"{head}; loss {_loss(d.loss)} before -> {_loss(a)} after ({a - d.loss:+.3f})"

    @staticmethod
    def _range_test(obs: Observation) -> str:
        """The LR range test's evidence, the numbers the rules use (lrpilot.controllers.rules.range_suggestion)."""
        r, p = obs.probes[0], RuleParams()
        found, at, why = range_suggestion(r.lrs, r.losses, p.range_divisor)
        pts = list(zip(r.lrs, r.losses, strict=False))
        every = max(1, len(pts) // 10)
        shown = pts[::every] + ([pts[-1]] if (len(pts) - 1) % every else [])  # the last (diverging) point too
        curve = ", ".join(f"{_lr(x)}: {_loss(y)}" for x, y in shown)
        head = (
            f"LR range test at this step: from the current state the trainer trained {len(pts)} updates with the "
            "LR rising geometrically, then restored the state (your LR still applies from this step). "
            f"Curve (LR: loss): {curve}. "
        )
        if not is_positive_finite(found):
            return head + why
        return head + f"{why} = {_lr(found)} (the rule controller would take that as its ceiling)"

    # ---------------------------------------------------------------------------------- decide

    def decide(self, obs: Observation) -> Decision:
        current = obs.lr if is_positive_finite(obs.lr) else obs.init_lr
        if self.range_steps and self.blocking and obs.step == obs.warmup_steps and not self._range_asked:
            self._range_asked = True
            top = current * RuleParams().range_factor
            return Decision(
                current,
                reason=f"range test first: {self.range_steps} updates from {_lr(current)} to {_lr(top)}",
                probe_lrs=(current, top),
                probe_steps=self.range_steps,
                probe_sweep=True,
            )
        try:
            messages = self.build_prompt(obs)
        except Exception as e:  # odd telemetry must not stop the round
            return Decision(current, reason=f"fallback: prompt not built ({type(e).__name__}: {e})", fallback=True)
        try:
            reply = self.backend.generate(messages, REPLY_SCHEMA_WITH_ROLLBACK if obs.rollback_steps else REPLY_SCHEMA)
        except Exception as e:  # backends should not raise; if one does, it is still just a failed call
            return Decision(
                current, reason=f"fallback: backend raised {type(e).__name__}: {str(e)[:200]}", fallback=True
            )
        meta = {"latency_s": round(reply.latency_s, 4), "usage": dict(reply.usage), "model": reply.model}
        if reply.error:
            meta["error"] = reply.error
            return Decision(current, reason=f"fallback: {reply.error}", raw=reply.text, fallback=True, meta=meta)
        lr, reason, err = parse_reply(reply.text)
        if lr is None:
            meta["error"] = err
            return Decision(current, reason=f"fallback: {err}", raw=reply.text, fallback=True, meta=meta)
        to_step, rb_err = parse_rollback(reply.text)
        if rb_err:
            meta["rollback_error"] = rb_err  # the LR stands; the malformed request is only logged
        return Decision(lr, reason=reason, raw=reply.text, meta=meta, rollback_to_step=to_step)


def _build(ctx: ControllerContext) -> LLMController:
    """The LLM Controller on ctx.backend, else on the backend cfg.agent describes (audited to ctx.audit_path)."""
    agent = ctx.cfg.agent
    backend = ctx.backend or make_backend(agent, "controller", ctx.audit_path, ctx.audit_extra or None)
    return LLMController(backend, guard=ctx.cfg.guard, blocking=agent.wait_for_decisions, range_steps=agent.range_steps)


#: `--controller llm` (registered in lrpilot.controllers.CONTROLLERS); its memory is the LLM Memory agent
SPEC = ControllerSpec(build=_build, default_memory="llm", uses_llm=True)
