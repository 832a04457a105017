import os
import shutil
import subprocess

import pytest

VAGRANT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "vagrant")


@pytest.mark.skipif(shutil.which("vagrant") is None and os.environ.get("CI") != "true",
                    reason="vagrant not installed (scripts/setup.sh test installs it)")
def test_vagrantfile_validates_and_provisions_with_the_readme_command(tmp_path):
    # Vagrant's state goes to tmp_path, not into the checkout (vagrant/.vagrant).
    result = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=VAGRANT_DIR,
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, VAGRANT_HOME=str(tmp_path / "home"),
                                     VAGRANT_DOTFILE_PATH=str(tmp_path / "dotfile")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout
    text = open(os.path.join(VAGRANT_DIR, "Vagrantfile")).read()
    assert "scripts/setup.sh test" in text
