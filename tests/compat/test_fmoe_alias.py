"""fastmoe.compat.install_fmoe_alias: FastMoE's ``fmoe`` imports give fastmoe's own modules, only on request, and
never over a real ``fmoe`` package."""

import os
import subprocess
import sys
import textwrap
import types

import pytest

import fastmoe
from conftest import mentions
from fastmoe.compat import install_fmoe_alias, uninstall_fmoe_alias


@pytest.fixture
def alias():
    assert "fmoe" not in sys.modules
    yield install_fmoe_alias()
    uninstall_fmoe_alias()
    assert "fmoe" not in sys.modules and not any(name.startswith("fmoe.") for name in sys.modules)


def test_fastmoe_code_runs_unchanged_in_a_fresh_process():
    """FastMoE's imports, in a process that has imported no fastmoe submodule yet: each ``fmoe.X`` is the module
    ``fastmoe.X`` itself (imported once, same classes), and names fastmoe lacks fail saying so."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        import fastmoe.compat
        fastmoe.compat.install_fmoe_alias()

        import fmoe
        from fmoe import FMoETransformerMLP
        from fmoe.gates import NaiveGate
        from fmoe.gates.naive_gate import NaiveGate as NaiveGate2
        from fmoe.testing.reference import reference_moe_mlp
        import fastmoe.testing.reference

        assert fmoe is fastmoe and NaiveGate is NaiveGate2 is fastmoe.gates.NaiveGate
        assert reference_moe_mlp is fastmoe.testing.reference.reference_moe_mlp
        assert sys.modules["fmoe.testing.reference"] is sys.modules["fastmoe.testing.reference"]
        assert sys.modules["fmoe.gates.naive_gate"].__spec__.name == "fastmoe.gates.naive_gate"
        layer = FMoETransformerMLP(num_expert=2, d_model=4, d_hidden=8, gate=NaiveGate, top_k=1)
        assert layer(torch.randn(3, 4)).shape == (3, 4)
        from fmoe.megatron import fmoefy

        assert fmoefy is fastmoe.fmoefy
        try:
            import fmoe.functions
        except ModuleNotFoundError as error:
            assert error.name == "fmoe.functions" and "fastmoe has no 'fastmoe.functions'" in str(error), error
        else:
            raise AssertionError("fmoe.functions imported")
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_install_is_idempotent_and_uninstall_forgets_every_alias(alias):
    import fmoe.gates

    assert alias is fastmoe and fmoe.gates is fastmoe.gates
    assert install_fmoe_alias() is fastmoe
    uninstall_fmoe_alias()
    with pytest.raises(ModuleNotFoundError):
        import fmoe  # noqa: F401
    install_fmoe_alias()  # the fixture uninstalls again


def test_a_real_fmoe_package_is_never_shadowed(tmp_path, monkeypatch):
    (tmp_path / "fmoe").mkdir()
    (tmp_path / "fmoe" / "__init__.py").write_text("REAL_FASTMOE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(RuntimeError, match=mentions("import fastmoe as fmoe", str(tmp_path / "fmoe"))):
            install_fmoe_alias()
        import fmoe

        assert fmoe.REAL_FASTMOE
        # now imported: refused again, and uninstall leaves it alone
        with pytest.raises(RuntimeError, match=mentions("already imported", str(tmp_path / "fmoe"))):
            install_fmoe_alias()
        uninstall_fmoe_alias()
        assert sys.modules["fmoe"] is fmoe
    finally:
        sys.modules.pop("fmoe", None)


def test_an_imported_fmoe_module_is_never_replaced(monkeypatch):
    stand_in = types.ModuleType("fmoe")
    monkeypatch.setitem(sys.modules, "fmoe", stand_in)
    with pytest.raises(RuntimeError, match=mentions("already imported", "fmoe")):
        install_fmoe_alias()
    assert sys.modules["fmoe"] is stand_in
