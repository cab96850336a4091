"""The Registry base: names, lazy entries, one-line errors naming the field and the choices."""

import pytest

from lrpilot.config import ConfigError
from lrpilot.registry import Registry


def test_add_get_names_and_help():
    reg: Registry[int] = Registry("widget", field="--widget")
    reg.add("a", 1, help="the first")
    reg.register("b", help="the second")(2)
    assert reg.get("a") == 1 and reg.get("b") == 2
    assert reg.names() == ["a", "b"] and "a" in reg and len(reg) == 2
    assert reg.help_text() == "a: the first; b: the second"


def test_unknown_name_is_one_line_error_with_choices():
    reg: Registry[int] = Registry("widget", field="--widget")
    reg.add("alpha", 1)
    with pytest.raises(ConfigError) as e:
        reg.get("alhpa")
    msg = str(e.value)
    assert "\n" not in msg and "--widget 'alhpa'" in msg and "alpha" in msg


def test_duplicate_and_bad_names_refused():
    reg: Registry[int] = Registry("widget", field="--widget")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 2)
    with pytest.raises(ValueError, match="non-empty word"):
        reg.add("two words", 3)


def test_lazy_entry_imports_on_first_get():
    reg: Registry[object] = Registry("thing", field="--thing")
    reg.add_lazy("dumps", "json:dumps")
    import json

    assert reg.get("dumps") is json.dumps
    with pytest.raises(ValueError, match="module:attr"):
        reg.add_lazy("bad", "json.dumps")
