"""The campaign memory contract (lrpilot.memory.base.Memory), checked on every memory in MEMORIES.

    python -m pytest -q tests/test_memory_contract.py

Every registered memory, built from a MemoryContext on a campaign directory that holds the published seed
rounds (tests/data/seed-experiments, imported), must:
  * brief the next round: a RoundBrief with a str text, params None or a RuleParams, and JSON-serialisable
    extra fields for briefs.jsonl;
  * brief a resumed round (prior = the briefs.jsonl line it wrote) with the same text and params, in this
    process and in a new one (a campaign killed and run again);
  * take record() for a finished round, the same round again (a resumed campaign tells every finished round),
    and a failed round with a NaN ppl, without raising; answer prune() with a bool and take record_pruned()
    twice (`campaign --prune`).
The llm memory talks to a real HTTP server on 127.0.0.1 (tests/llm_servers.py) through agent.backend=openai.
A memory registered in its own file is covered with no edit here (CONTROLLER_OF names the controller a memory
needs when CampaignSettings allows only one).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from llm_servers import ScriptedServer, chat_body

from lrpilot.campaign import CampaignSettings
from lrpilot.campaign_logs import load_campaign
from lrpilot.config import AgentConfig, load_config
from lrpilot.controllers.rules import RuleParams
from lrpilot.importer import import_published
from lrpilot.memory.base import MEMORIES, Memory, MemoryContext, RoundBrief

SEED = Path(__file__).parent / "data" / "seed-experiments"
#: the controller each memory serves (CampaignSettings refuses other pairs); others: rules
CONTROLLER_OF = {"llm": "llm", "optuna": "rules"}


@pytest.fixture
def server():
    srv = ScriptedServer([(200, chat_body("Climb to 3e-3 by mid-run, then decay linearly; 1e-2 diverged."), {})])
    yield srv
    srv.stop()


def _context(name: str, directory: Path, base_url: str) -> MemoryContext:
    cfg = load_config("cpu-smoke")
    cfg = dataclasses.replace(cfg, agent=AgentConfig(backend="openai", base_url=base_url, model="scripted"))
    settings = CampaignSettings(
        preset="cpu-smoke", overrides=(), controller=CONTROLLER_OF.get(name, "rules"), memory=name
    )
    return MemoryContext(cfg, directory, settings, parallel=False)


def _line(r: int, name: str, b: RoundBrief) -> dict:
    """The briefs.jsonl line the campaign writes for round r (campaign._prepare_round)."""
    return json.loads(json.dumps({"round": r, "memory": name, "brief": b.text, **b.extra}, allow_nan=False))


@pytest.mark.parametrize("name", MEMORIES.names())
def test_memory_contract(name, server, tmp_path, monkeypatch):
    for var in ("DASHSCOPE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)  # a 127.0.0.1 endpoint needs no key
    directory = tmp_path / "camp"
    import_published(SEED, directory)
    r = max(x.round for x in load_campaign(directory).rounds) + 1
    mem = MEMORIES.get(name)(_context(name, directory, server.base_url))
    assert isinstance(mem, Memory) and isinstance(mem.uses_llm, bool)

    b = mem.brief(r, run_start_iso="2026-01-01T00:00:00")
    assert isinstance(b, RoundBrief) and isinstance(b.text, str)
    assert b.params is None or isinstance(b.params, RuleParams)
    line = _line(r, name, b)  # extra is JSON without NaN
    if mem.uses_llm:
        assert b.text and len(server.posts) == 1, "an LLM memory briefs from the LLM"

    again = mem.brief(r, prior=line)
    assert (again.text, again.params) == (b.text, b.params), "a resumed round keeps its brief"
    resumed = MEMORIES.get(name)(_context(name, directory, server.base_url))
    other = resumed.brief(r, prior=line)
    assert (other.text, other.params) == (b.text, b.params), "and so does a new process on the same directory"

    mem.record(r, 12.5, False)
    mem.record(r, 12.5, False)  # told again when the campaign resumes
    resumed.record(r, 12.5, False)
    nxt = mem.brief(r + 1)
    assert isinstance(nxt.text, str)
    mem.record(r + 1, math.nan, True)  # a failed round: no ppl

    # the optional pruning hooks (campaign --prune): a bool for an eval of a running round; a pruned round told
    # twice without raising (a memory that does not override prune never prunes)
    nxt2 = mem.brief(r + 2)
    assert isinstance(nxt2.text, str)
    said = mem.prune(r + 2, 10, 3.0)
    assert isinstance(said, bool) and (said is False or type(mem).can_prune())
    mem.record_pruned(r + 2, 11, 3.0)
    mem.record_pruned(r + 2, 11, 3.0)


def test_every_memory_is_documented_in_the_cli_help():
    from lrpilot.cli import build_parser

    text = "".join(build_parser()._subparsers._group_actions[0].choices["campaign"].format_help().split())
    assert all(f"{n}:" in text for n in MEMORIES.names())
