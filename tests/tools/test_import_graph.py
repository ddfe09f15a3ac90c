"""The runtime's import graph holds no tool: `import dsinfer`, the command line's parser and `dsinfer serve` up
to a built OpenAI app import neither transformers, nor dsinfer.tools (bench, trainer), nor matplotlib. Each check
runs in a fresh interpreter, so that what other tests imported does not count."""
import json
import subprocess
import sys

import pytest

TOOLS = ("transformers", "dsinfer.tools", "matplotlib")

REPORT = f"""
import json, sys
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {TOOLS!r} or m.startswith("dsinfer.tools"))))
"""

SERVE = """
import uvicorn
import dsinfer.cli
served = []
uvicorn.run = lambda app, **kw: served.append(app)  # everything `dsinfer serve` does but listen
assert dsinfer.cli.main(["serve", "--model", sys.argv[1], "--max-model-len", "256"]) == 0 and served
import dsinfer.server.app
"""


def tools_imported(code: str, *args: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", "import sys\n" + code + REPORT, *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("code", ["import dsinfer", "import dsinfer.cli; dsinfer.cli.parser()",
                                  "import dsinfer.server.app"])
def test_runtime_imports_no_tool(code):
    assert tools_imported(code) == []


def test_serving_a_model_imports_no_tool(ckpts):
    assert tools_imported(SERVE, str(ckpts["v3"])) == []


def test_the_check_sees_a_tool_when_one_is_imported():
    assert "dsinfer.tools.bench.command" in tools_imported("import dsinfer.tools.bench.command")
