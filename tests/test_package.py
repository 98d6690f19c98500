"""The addrmem package: ``import addrmem.ops`` (and the torch-only modules)
needs torch alone; the rest of the public API loads on first use."""

import os
import subprocess
import sys

import addrmem


def test_the_op_and_the_memories_need_torch_alone():
    code = ("import sys\n"
            "for name in ('numpy', 'yaml', 'tqdm', 'torchvision'): sys.modules[name] = None  # not installed\n"
            "import addrmem.ops, addrmem\n"
            "assert addrmem.synthesize and addrmem.AddressableMemory and addrmem.hypergradient\n"
            "try:\n"
            "    addrmem.DistillConfig\n"
            "except ImportError:\n"
            "    print('lazy')\n")
    # Run beside the addrmem this process imported (the installed one in CI, not the source tree).
    beside = os.path.dirname(os.path.dirname(addrmem.__file__))
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=beside)
    assert done.returncode == 0 and done.stdout.strip() == "lazy", done.stderr


def test_every_public_name_resolves_to_the_object_not_its_module():
    import addrmem.distill  # noqa: F401  imports addrmem.evaluation and addrmem.hypergradient as modules

    for name in addrmem.__all__:
        value = getattr(addrmem, name)
        assert getattr(value, "__name__", name) == name or name == "NETWORKS", name
        assert not isinstance(value, type(addrmem)), name
    assert sorted(addrmem.__all__) == addrmem.__all__ and set(addrmem.__all__) <= set(dir(addrmem))


def test_every_module_the_package_imports_is_a_declared_dependency():
    """What README's first install line installs is enough for every command
    (plots included): each third-party module imported anywhere in addrmem/
    is in setup.py's install_requires."""
    import ast
    import re

    root = os.path.join(os.path.dirname(__file__), "..")
    setup = open(os.path.join(root, "setup.py")).read()
    declared = re.search(r"install_requires=\[(.*?)\]", setup, re.S).group(1)
    declared = {re.split(r"[<>=; ]", name.strip().strip('"'))[0].lower() for name in declared.split(",")}
    dist_of = {"sklearn": "scikit-learn", "yaml": "pyyaml"}
    imported = set()
    for folder, _, files in os.walk(os.path.join(root, "addrmem")):
        for name in files:
            if name.endswith(".py"):
                tree = ast.parse(open(os.path.join(folder, name)).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        imported |= {alias.name.split(".")[0] for alias in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        imported.add(node.module.split(".")[0])
    third_party = {dist_of.get(m, m) for m in imported if m not in sys.stdlib_module_names and m != "addrmem"}
    assert "matplotlib" in third_party
    assert third_party <= declared, third_party - declared
