"""The Argo CD health check for FineTuneJob, run in gopher-lua (the engine Argo CD embeds) and in
the real Lua 5.1 interpreter.

Every case in argocd/.../FineTuneJob/health_test.yaml (Argo CD's own test layout) is run the way
Argo CD runs a check from argocd-cm: as a chunk whose return value is the health table, with the
object as the global `obj` and without the string, math and io libraries (no string methods).
gopher-lua: hack/luarun, a small Go program on github.com/yuin/gopher-lua that opens what Argo CD
opens (package, base, table, a reduced os); the test builds it once into the user's cache.
Lua 5.1: the object as a table literal, the chunk in an environment of the base functions and the
table library. Both engines must give the same answers; gopher-lua speaks Lua 5.1, so the script
also avoids everything newer than 5.1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api.resource import FineTuneJob, FineTuneJobStatus

REPO = Path(__file__).resolve().parents[2]
ARGOCD = REPO / "argocd"
CHECK_DIR = ARGOCD / "resource_customizations" / "finetune.dev" / "FineTuneJob"
HEALTH_LUA = CHECK_DIR / "health.lua"
HEALTH_TESTS = CHECK_DIR / "health_test.yaml"
CM_KEY = "resource.customizations.health.finetune.dev_FineTuneJob"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as strings, as they are in a Kubernetes object."""


_PlainLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_PlainLoader)


# --- Python value -> Lua 5.1 source --------------------------------------------------------------


def lua_string(text: str) -> str:
    """A double-quoted Lua 5.1 string literal holding text's UTF-8 bytes exactly."""
    out = ['"']
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            # Always three digits: Lua reads up to three, so a following digit can't join in.
            out.append(f"\\{byte:03d}")
    out.append('"')
    return "".join(out)


def lua_float(value: float) -> str:
    if math.isnan(value):
        return "(0/0)"
    if math.isinf(value):
        return "(1/0)" if value > 0 else "(-1/0)"
    return repr(value)  # the shortest round-tripping form; Lua reads 1e-05 and 2.5 alike


def lua_scalar(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value) if isinstance(value, int) else lua_float(value)
    if isinstance(value, str):
        return lua_string(value)
    raise TypeError(f"no Lua form for {type(value).__name__}: {value!r}")


def lua_literal(value: Any) -> str:
    """Lua 5.1 source for a JSON-like value: tables for dicts and 1-based arrays for lists.

    None becomes nil: a dict key whose value is None is left out (Lua cannot hold nil in a table);
    in a list it stays a positional nil, as Argo CD's decoder also produces no element there.
    """
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(item) for item in value) + "}"
    if isinstance(value, dict):
        entries = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"object keys must be strings, got {key!r}")
            if item is not None:
                entries.append(f"[{lua_string(key)}] = {lua_literal(item)}")
        return "{" + ", ".join(entries) + "}"
    return lua_scalar(value)


# --- running Lua ---------------------------------------------------------------------------------

# What a check configured in argocd-cm can call without useOpenLibs: gopher-lua's base library
# and the table library (Argo CD also adds package and a reduced os, which health.lua must not
# need). Anything else is absent from the chunk's environment.
_BASE_FUNCTIONS = (
    "assert",
    "error",
    "getmetatable",
    "ipairs",
    "next",
    "pairs",
    "pcall",
    "print",
    "rawequal",
    "rawget",
    "rawset",
    "select",
    "setmetatable",
    "tonumber",
    "tostring",
    "type",
    "unpack",
    "xpcall",
)

_WRAPPER = """
local chunk, load_error = loadfile({script})
if chunk == nil then
  io.stderr:write("cannot load the script: ", tostring(load_error), "\\n")
  os.exit(2)
end
local env = {{ obj = {obj}, table = table }}
for _, name in ipairs({{ {base} }}) do
  env[name] = _G[name]
end
env._G = env
setfenv(chunk, env)
local string_meta = getmetatable("")
local string_index = string_meta.__index
string_meta.__index = nil
local ok, hs = pcall(chunk)
string_meta.__index = string_index
if not ok then
  io.stderr:write("the script raised: ", tostring(hs), "\\n")
  os.exit(3)
end
if type(hs) ~= "table" then
  io.stderr:write("the script returned a ", type(hs), ", not a table\\n")
  os.exit(4)
end
if type(hs.status) ~= "string" or (hs.message ~= nil and type(hs.message) ~= "string") then
  io.stderr:write("status must be a string and message a string or nil\\n")
  os.exit(5)
end
io.write(hs.status, "\\n", hs.message or "")
"""


def lua_interpreter() -> str:
    found = shutil.which("lua5.1")
    if found is None:
        pytest.fail(
            "lua5.1 is not installed: the Argo CD health check is tested with the real Lua 5.1 "
            "interpreter (Debian/Ubuntu: apt-get install lua5.1)"
        )
    return found


def run_lua(source: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [lua_interpreter(), "-"],
        input=source,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# --- gopher-lua ----------------------------------------------------------------------------------

LUARUN = REPO / "hack" / "luarun"


def go_tool() -> str:
    found = shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go",) if Path(p).exists()), None
    )
    if found is None:
        pytest.fail(
            "go is not installed: the Argo CD health check runs in gopher-lua (hack/luarun)"
        )
    return found


def gopher_lua() -> Path:
    """hack/luarun built once per source version into ~/.cache/finetune-operator (or
    $XDG_CACHE_HOME); the Go module proxy provides gopher-lua, pinned by go.mod and go.sum."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((LUARUN / name).read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    binary = cache / "finetune-operator" / f"luarun-{digest.hexdigest()[:16]}" / "luarun"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=binary.parent) as scratch:
            built = Path(scratch) / "luarun"
            env = {**os.environ, "GOFLAGS": "-mod=readonly", "GOTOOLCHAIN": "local"}
            result = subprocess.run(
                [go_tool(), "build", "-o", str(built), "."],
                cwd=LUARUN,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert result.returncode == 0, f"building hack/luarun failed: {result.stderr}"
            built.replace(binary)
    return binary


def evaluate_gopher(obj: dict[str, Any], script: Path = HEALTH_LUA) -> tuple[str, str]:
    """Run the health script on obj in gopher-lua as Argo CD does; return (status, message)."""
    result = subprocess.run(
        [str(gopher_lua()), str(script)],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"luarun exited {result.returncode}: {result.stderr.strip()}"
    status, _, message = result.stdout.partition("\n")
    return status, message


def evaluate_both(obj: dict[str, Any], script: Path = HEALTH_LUA) -> tuple[str, str]:
    """The answer of gopher-lua, which Lua 5.1 must give too."""
    answer = evaluate_gopher(obj, script)
    assert evaluate(obj, script) == answer, "Lua 5.1 and gopher-lua disagree"
    return answer


def evaluate(obj: dict[str, Any], script: Path = HEALTH_LUA) -> tuple[str, str]:
    """Run the health script on obj in Lua 5.1; return (status, message)."""
    source = _WRAPPER.format(
        script=lua_string(str(script)),
        obj=lua_literal(obj),
        base=", ".join(lua_string(name) for name in _BASE_FUNCTIONS),
    )
    result = run_lua(source)
    assert result.returncode == 0, f"lua5.1 exited {result.returncode}: {result.stderr.strip()}"
    status, _, message = result.stdout.partition("\n")
    return status, message


# --- the cases -----------------------------------------------------------------------------------


def health_cases() -> list[Any]:
    cases = load_yaml(HEALTH_TESTS)["tests"]
    return [pytest.param(case, id=Path(case["inputPath"]).stem) for case in cases]


@pytest.mark.parametrize("engine", [evaluate_gopher, evaluate], ids=["gopher-lua", "lua5.1"])
@pytest.mark.parametrize("case", health_cases())
def test_health(case: dict[str, Any], engine: Any) -> None:
    expected = case["healthStatus"]
    assert expected["status"] in ARGO_STATUSES
    obj = load_yaml(CHECK_DIR / case["inputPath"])
    status, message = engine(obj)
    assert (status, message) == (expected["status"], expected["message"])


def test_every_testdata_file_has_a_case() -> None:
    listed = {case["inputPath"] for case in load_yaml(HEALTH_TESTS)["tests"]}
    present = {f"testdata/{path.name}" for path in (CHECK_DIR / "testdata").glob("*.yaml")}
    assert listed == present


def test_every_status_and_branch_is_covered() -> None:
    statuses = {case["healthStatus"]["status"] for case in load_yaml(HEALTH_TESTS)["tests"]}
    assert statuses == {"Healthy", "Progressing", "Degraded", "Suspended"}
    # Each `hs.message = "...` literal prefix in the script shows up in some expected message.
    messages = [case["healthStatus"]["message"] for case in load_yaml(HEALTH_TESTS)["tests"]]
    literals = re.findall(r'hs\.message = "([^"]+)"', HEALTH_LUA.read_text())
    assert literals
    for literal in literals:
        assert any(message.startswith(literal) for message in messages), literal


@pytest.mark.parametrize("case", health_cases())
def test_testdata_matches_the_api_models(case: dict[str, Any]) -> None:
    """The inputs use the real status field names, so the script reads what the operator writes."""
    obj = load_yaml(CHECK_DIR / case["inputPath"])
    status = obj.get("status")
    if status is not None:
        dumped = FineTuneJobStatus.model_validate(status).model_dump(
            mode="json", by_alias=True, exclude_unset=True
        )
        assert dumped == status, "testdata status has fields the API models do not know"
    conditions = (status or {}).get("conditions", [])
    invalid = any(c["type"] == "Validated" and c["status"] == "False" for c in conditions)
    if not invalid:
        FineTuneJob.from_object(obj)


def test_missing_status_fields_do_not_break_the_script() -> None:
    base = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob"}
    assert evaluate_both(base) == ("Progressing", "waiting for the operator")
    assert evaluate_both({**base, "status": {}}) == (
        "Progressing",
        "waiting for the operator to validate the spec",
    )
    odd = {**base, "status": {"conditions": [None, "junk", {"type": "Running"}], "progress": {}}}
    assert evaluate_both(odd) == ("Progressing", "waiting for the operator to validate the spec")


@pytest.mark.parametrize(
    ("loss", "shown"),
    [
        (1.2341, "1.234"),
        (0.0005, "0.001"),
        (0.0004, "0.000"),
        (-0.0004, "0.000"),
        (2.0, "2.000"),
        (12.3456, "12.346"),
        (-3.5, "-3.500"),
        (999999999.9994, "999999999.999"),
        (999999999.9996, "1000000000.000"),
        (1e9, "1.000e+9"),
        (1e14, "1.000e+14"),
        (1e15, "1.000e+15"),  # was "1e+15.000" in Lua 5.1
        (1.23456e15, "1.235e+15"),
        (9.9996e20, "1.000e+21"),
        (1e20, "1.000e+20"),  # gopher-lua printed "9.999999999999998e+19.392"
        (1.7e308, "1.700e+308"),
    ],
)
def test_loss_rounding(loss: float, shown: str) -> None:
    obj = {"status": {"phase": "Running", "progress": {"loss": loss}}}
    assert evaluate_both(obj) == ("Progressing", f"training: loss {shown}")


def test_generation_numbers_given_as_strings() -> None:
    # Argo CD's decoder turns json.Number values into Lua strings; tonumber() must cope.
    obj = {"metadata": {"generation": "4"}, "status": {"observedGeneration": "3"}}
    assert evaluate_both(obj) == (
        "Progressing",
        "waiting for the operator: generation 4 not observed yet (status is for generation 3)",
    )


@pytest.mark.parametrize(
    ("step", "shown"),
    [
        (99_999_999_999_999, "99999999999999"),
        (10**14, "1.000e+14"),
        (10**15 + 1, "1.000e+15"),
        (2**53, "9.007e+15"),
        (10**20, "1.000e+20"),  # gopher-lua's tonumber() could not read back its own "1e+20"
    ],
)
def test_large_whole_numbers(step: int, shown: str) -> None:
    obj = {"status": {"phase": "Running", "progress": {"step": step, "totalSteps": step}}}
    assert evaluate_both(obj) == ("Progressing", f"training: step {shown}/{shown} (100%)")


def test_the_engines_print_large_whole_numbers_differently(tmp_path: Path) -> None:
    """Why health.lua formats numbers from 1e14 on by hand: tostring() differs there."""
    script = tmp_path / "print.lua"
    script.write_text(
        'return { status = "Healthy", message = tostring(1e14) .. " " .. tostring(99) }'
    )
    assert evaluate_gopher({}, script) == ("Healthy", "100000000000000 99")
    assert evaluate({}, script) == ("Healthy", "1e+14 99")


def test_gopher_lua_runs_without_the_string_library(tmp_path: Path) -> None:
    """As in Argo CD without useOpenLibs: no string, math or io, no string methods."""
    script = tmp_path / "libs.lua"
    script.write_text(
        "local s = 'x'\n"
        "local ok = pcall(function() return s:upper() end)\n"
        "return { status = 'Healthy', message = tostring(string) .. ' ' .. tostring(math) .. ' ' "
        ".. tostring(io) .. ' ' .. tostring(ok) .. ' ' .. type(table.insert) .. ' ' .. type(os.time) }"
    )
    assert evaluate_gopher({}, script) == ("Healthy", "nil nil nil false function function")


# --- the serializer itself -----------------------------------------------------------------------


def test_lua_literal_round_trips_through_lua() -> None:
    tricky = 'quote " backslash \\ newline \n tab \t nul \x00 digit-after-escape \x01' + "9 é ✓"
    value = {
        "text": tricky,
        "list": [1, "two", 3.5, True, False],
        "nested": {"a.b/c": {"deep": [{"x": -7}]}},
        "dropped": None,
    }
    source = (
        f"local v = {lua_literal(value)}\n"
        "assert(v.dropped == nil)\n"
        "assert(#v.list == 5 and v.list[1] == 1 and v.list[2] == 'two' and v.list[3] == 3.5)\n"
        "assert(v.list[4] == true and v.list[5] == false)\n"
        "assert(v.nested['a.b/c'].deep[1].x == -7)\n"
        "io.write(v.text)\n"
    )
    result = subprocess.run(
        [lua_interpreter(), "-"], input=source.encode(), capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == tricky.encode("utf-8")


def test_lua_literal_special_numbers() -> None:
    assert lua_literal(float("inf")) == "(1/0)"
    assert lua_literal(float("-inf")) == "(-1/0)"
    assert lua_literal(float("nan")) == "(0/0)"
    assert lua_literal(1e-05) == "1e-05"
    with pytest.raises(TypeError):
        lua_literal({1: "int key"})


# --- Lua 5.1 / gopher-lua compatibility ----------------------------------------------------------

_LONG_BRACKET = re.compile(r"\[(=*)\[")


def split_lua(source: str) -> tuple[str, list[str]]:
    """Split Lua source into code (comments removed, strings blanked) and raw string literals."""
    code: list[str] = []
    strings: list[str] = []
    i = 0
    while i < len(source):
        if source.startswith("--", i):
            bracket = _LONG_BRACKET.match(source, i + 2)
            if bracket:
                close = "]" + bracket.group(1) + "]"
                end = source.find(close, bracket.end())
                i = len(source) if end < 0 else end + len(close)
            else:
                end = source.find("\n", i)
                i = len(source) if end < 0 else end
            continue
        bracket = _LONG_BRACKET.match(source, i)
        if bracket:
            close = "]" + bracket.group(1) + "]"
            end = source.find(close, bracket.end())
            end = len(source) if end < 0 else end
            strings.append(source[bracket.end() : end])
            code.append('""')
            i = end + len(close)
            continue
        char = source[i]
        if char in "\"'":
            j = i + 1
            while j < len(source) and source[j] != char:
                j += 2 if source[j] == "\\" else 1
            strings.append(source[i + 1 : j])
            code.append('""')
            i = j + 1
            continue
        code.append(char)
        i += 1
    return "".join(code), strings


_NOT_IN_LUA51 = {
    "goto / labels (Lua 5.2)": re.compile(r"\bgoto\b|::\w+::"),
    "// integer division (Lua 5.3)": re.compile(r"//"),
    "bitwise operators (Lua 5.3)": re.compile(r"&|\||<<|>>|~(?!=)"),
    "utf8 library (Lua 5.3)": re.compile(r"\butf8\b"),
    "bit32 library (Lua 5.2)": re.compile(r"\bbit32\b"),
    "table.unpack/table.pack/table.move (Lua 5.2+)": re.compile(r"\btable\.(unpack|pack|move)\b"),
    "load with a string chunk / loadstring / dofile / require": re.compile(
        r"\b(load|loadstring|dofile|loadfile|require)\s*\("
    ),
    "string, math, os, io, debug or coroutine library (absent in argocd-cm checks)": re.compile(
        r"\b(string|math|os|io|debug|coroutine)\s*\."
    ),
    "method call (string methods need the string library)": re.compile(
        r"[\w)\]]\s*:\s*\w+\s*[(\"'{]"
    ),
}
_NEW_ESCAPES = re.compile(r"\\(z|x[0-9a-fA-F]{2}|u\{)")


def lua51_problems(source: str) -> list[str]:
    code, strings = split_lua(source)
    problems = [name for name, pattern in _NOT_IN_LUA51.items() if pattern.search(code)]
    if any(_NEW_ESCAPES.search(text) for text in strings):
        problems.append("string escapes \\z, \\xXX or \\u{...} (Lua 5.2+)")
    return problems


def test_health_script_uses_only_lua51_and_the_base_library() -> None:
    assert lua51_problems(HEALTH_LUA.read_text()) == []


def test_health_script_parses_as_lua51() -> None:
    result = run_lua(f"assert(loadfile({lua_string(str(HEALTH_LUA))}))")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("snippet", "problem"),
    [
        ("for i = 1, 3 do if i == 2 then goto done end end ::done::", "goto"),
        ("local half = n // 2", "//"),
        ("local flags = a & b", "bitwise"),
        ("local flags = a | b", "bitwise"),
        ("local flags = ~a", "bitwise"),
        ("local shifted = a << 2", "bitwise"),
        ("local n = utf8.len(s)", "utf8"),
        ('local s = string.format("%d", n)', "string, math"),
        ("local n = math.floor(x)", "string, math"),
        ("local s = name:upper()", "method call"),
        ('local s = "\\x41"', "escapes"),
        ("local a, b = table.unpack(t)", "table.unpack"),
    ],
)
def test_compatibility_check_catches(snippet: str, problem: str) -> None:
    found = lua51_problems(snippet)
    assert any(problem in name for name in found), found


def test_compatibility_check_ignores_comments_and_strings() -> None:
    source = '-- string.format and goto in a comment\nlocal s = "a // b & c :: d"\n--[[ x | y ]]\n'
    assert lua51_problems(source) == []
    assert lua51_problems("if a ~= b then return end") == []


# --- the copies of the script in the install snippets --------------------------------------------


@pytest.mark.parametrize(
    ("path", "keys"),
    [
        ("argocd-cm-patch.yaml", ("data", CM_KEY)),
        ("helm-values.yaml", ("configs", "cm", CM_KEY)),
    ],
)
def test_install_snippets_carry_the_current_script(path: str, keys: tuple[str, ...]) -> None:
    node: Any = load_yaml(ARGOCD / path)
    for key in keys:
        node = node[key]
    assert node == HEALTH_LUA.read_text(), (
        f"argocd/{path} is out of date: paste health.lua into it again (a literal block, `|`)"
    )


def test_application_example_is_an_argocd_application() -> None:
    app = load_yaml(ARGOCD / "application.yaml")
    assert app["apiVersion"] == "argoproj.io/v1alpha1"
    assert app["kind"] == "Application"
    source = app["spec"]["source"]
    assert source["repoURL"] and source["path"] and source["targetRevision"]
    assert "ignoreDifferences" not in app["spec"]
