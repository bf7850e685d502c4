"""notebooks/compare.ipynb runs top to bottom against a reproduced micro pipeline and its ledger."""
import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT, repo_env


def test_compare_notebook_executes(micro_copy, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / "compare.ipynb", as_version=4)
    for key, value in repo_env(MASKLLM_LEDGER=str(micro_copy / "records" / "states.json")).items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    (micro_copy / "notebooks").mkdir(exist_ok=True)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(micro_copy / "notebooks")}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "pipeline states of" in outputs and "MaskLLM closes" in outputs
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
