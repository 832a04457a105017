import os

import pytest

from closewait_trace.kernel import kernel_headers as kh
from closewait_trace.errors import EXIT_NO_HEADERS, UserError


def make_debian_split(src):
    common = src / "linux-headers-6.1.0-9-common"
    arch = src / "linux-headers-6.1.0-9-amd64"
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/kconfig.h").write_text("/* common */")
    (common / "include/linux/types.h").write_text("/* common types */")
    (common / "arch/x86/include/asm").mkdir(parents=True)
    (common / "arch/x86/include/asm/x.h").write_text("/* asm */")
    (arch / "include/generated").mkdir(parents=True)
    (arch / "include/generated/autoconf.h").write_text("#define CONFIG_X 1")
    (arch / "include/linux").mkdir(parents=True)
    (arch / "include/linux/types.h").write_text("/* arch override */")
    (arch / "Makefile").write_text(f"include {common}/Makefile\n")
    (common / "Makefile").write_text("")
    kbuild = src / "kbuild-scripts"
    kbuild.mkdir()
    os.symlink("../kbuild-scripts", arch / "scripts")
    return arch, common


def test_running_kernel_headers_win(tmp_path):
    build = tmp_path / "lm/6.18.0/build"
    (build / "include/generated").mkdir(parents=True)
    (build / "include/linux").mkdir(parents=True)
    (build / "include/generated/autoconf.h").write_text("")
    (build / "include/linux/kconfig.h").write_text("")
    choice = kh.choose_headers(release="6.18.0", lib_modules=str(tmp_path / "lm"),
                               usr_src=str(tmp_path / "src"), environ={}, machine="x86_64")
    assert choice.kind == "running" and choice.path is None


def test_env_override_is_respected(tmp_path):
    for header in ("include/generated/autoconf.h", "include/linux/kconfig.h"):
        (tmp_path / "k" / header).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "k" / header).write_text("")
    tree = str(tmp_path / "k")
    choice = kh.choose_headers(release="x", lib_modules=str(tmp_path), usr_src=str(tmp_path),
                               environ={"BCC_KERNEL_SOURCE": tree})
    assert choice.kind == "env" and choice.path == tree


@pytest.mark.parametrize("preset", ["/nonexistent/k", "/etc/passwd", "/", "/usr",
                                    # Debian's arch-only half: no include/linux/kconfig.h
                                    "/usr/src/linux-headers-6.1.0-57-amd64"])
def test_env_override_that_is_no_header_tree_is_one_line_exit_5(tmp_path, preset):
    # bcc would print its own complaint on stdout and fail at compile time
    # (exit 6, as if the kernel had refused the program).
    with pytest.raises(UserError) as err:
        kh.choose_headers(release="x", lib_modules=str(tmp_path), usr_src=str(tmp_path),
                          environ={"BCC_KERNEL_SOURCE": preset})
    assert err.value.exit_code == EXIT_NO_HEADERS
    assert "BCC_KERNEL_SOURCE" in err.value.one_line() and "\n" not in err.value.one_line()


def test_generic_debian_split_is_merged_into_private_cache(tmp_path):
    src = tmp_path / "src"
    arch, common = make_debian_split(src)
    cache = tmp_path / "cache" / "kernel-headers"
    choice = kh.choose_headers(release="6.18.44-custom", lib_modules=str(tmp_path / "lm"),
                               usr_src=str(src), cache_dir=str(cache), machine="x86_64",
                               environ={})
    assert choice.kind == "generic"
    tree = choice.path
    assert tree.startswith(str(cache))
    assert open(os.path.join(tree, "include/linux/kconfig.h")).read() == "/* common */"
    assert open(os.path.join(tree, "include/linux/types.h")).read() == "/* arch override */"
    assert os.path.isfile(os.path.join(tree, "arch/x86/include/asm/x.h"))
    assert os.path.realpath(os.path.join(tree, "scripts")) == str(src / "kbuild-scripts")
    assert oct(os.stat(cache).st_mode & 0o777) == "0o700"
    # Second call reuses the tree as is.
    stamp = os.path.join(tree, ".closewait-trace-complete")
    before = os.stat(stamp).st_mtime_ns
    again = kh.choose_headers(release="6.18.44-custom", lib_modules=str(tmp_path / "lm"),
                              usr_src=str(src), cache_dir=str(cache), machine="x86_64",
                              environ={})
    assert again.path == tree and os.stat(stamp).st_mtime_ns == before


def test_cache_writable_by_others_is_refused(tmp_path):
    src = tmp_path / "src"
    make_debian_split(src)
    cache = tmp_path / "cache" / "kernel-headers"
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    with pytest.raises(UserError):
        kh.merged_tree(str(src / "linux-headers-6.1.0-9-amd64"), str(cache))


def test_merged_tree_links_whole_directories_where_the_trees_do_not_overlap(tmp_path):
    src = tmp_path / "src"
    arch, common = make_debian_split(src)
    cache = tmp_path / "cache" / "kernel-headers"
    tree = kh.merged_tree(str(arch), str(cache))
    # arch/ is only in the common part: one link for the whole directory.
    assert os.path.islink(os.path.join(tree, "arch"))
    assert os.path.realpath(os.path.join(tree, "arch")) == str(common / "arch")
    # include/ is in both: a real directory, merged inside.
    assert not os.path.islink(os.path.join(tree, "include"))
    assert os.path.islink(os.path.join(tree, "include/generated"))
    entries = sum(len(d) + len(f) for _, d, f in os.walk(tree))
    assert entries <= 10, entries


def test_cache_from_the_old_per_file_layout_is_rebuilt(tmp_path):
    src = tmp_path / "src"
    arch, common = make_debian_split(src)
    cache = tmp_path / "cache" / "kernel-headers"
    old = cache / arch.name
    (old / "include/generated").mkdir(parents=True)
    (old / "include/linux").mkdir(parents=True)
    (old / "include/generated/autoconf.h").write_text("stale")
    (old / "include/linux/kconfig.h").write_text("stale")
    (old / ".closewait-trace-complete").write_text(f"{common}\n{arch}\n")
    os.chmod(tmp_path / "cache", 0o700)
    os.chmod(cache, 0o700)
    tree = kh.merged_tree(str(arch), str(cache))
    assert open(os.path.join(tree, "include/generated/autoconf.h")).read() == "#define CONFIG_X 1"
    assert sorted(os.listdir(cache)) == [arch.name]


def make_generic(src, name):
    tree = src / name
    (tree / "include/generated").mkdir(parents=True)
    (tree / "include/generated/autoconf.h").write_text("")
    (tree / "include/linux").mkdir(parents=True)
    (tree / "include/linux/kconfig.h").write_text("")


@pytest.mark.parametrize("release,expected", [
    ("6.18.44-fc-v782", "linux-headers-6.12.117+deb12-amd64"),
    ("6.2.0-1", "linux-headers-6.1.0-57-amd64"),     # 6.1 is closer than 6.12
    ("6.1.0-56-amd64", "linux-headers-6.1.0-57-amd64"),  # same series: the newest
    ("5.4.0-216-generic", "linux-headers-5.10.0-30-amd64"),
])
def test_several_generic_trees_pick_the_closest_series_then_the_newest(tmp_path, release, expected):
    src = tmp_path / "src"
    for name in ("linux-headers-6.1.0-9-amd64", "linux-headers-6.1.0-57-amd64",
                 "linux-headers-6.12.117+deb12-amd64", "linux-headers-5.10.0-30-amd64"):
        make_generic(src, name)
    choice = kh.choose_headers(release=release, lib_modules=str(tmp_path / "lm"),
                               usr_src=str(src), cache_dir=str(tmp_path / "c"),
                               machine="x86_64", environ={})
    assert choice.path == str(src / expected)
    assert f"the closest to {release} of 4 installed" in choice.describe()


def test_debian_split_running_headers_are_complete(tmp_path):
    """build/ has the generated arch part, source/ the -common part."""
    src = tmp_path / "src"
    arch, common = make_debian_split(src)
    modules = tmp_path / "lm" / "6.1.0-9-amd64"
    modules.mkdir(parents=True)
    os.symlink(arch, modules / "build")
    os.symlink(common, modules / "source")
    choice = kh.choose_headers(release="6.1.0-9-amd64", lib_modules=str(tmp_path / "lm"),
                               usr_src=str(src), cache_dir=str(tmp_path / "c"),
                               machine="x86_64", environ={})
    assert choice.kind == "running" and choice.path is None
    os.unlink(modules / "source")            # build alone is not complete
    choice = kh.choose_headers(release="6.1.0-9-amd64", lib_modules=str(tmp_path / "lm"),
                               usr_src=str(src), cache_dir=str(tmp_path / "c"),
                               machine="x86_64", environ={})
    assert choice.kind == "generic"


def installed_debian_split():
    """A real Debian kernel headers install (linux-headers-*-amd64 with its
    -common part), as the README's set-up leaves one."""
    import glob
    for source in sorted(glob.glob("/lib/modules/*/source")):
        modules = os.path.dirname(source)
        if os.path.realpath(source).endswith("-common") and \
                not os.path.isfile(os.path.join(modules, "build/include/linux/kconfig.h")):
            return modules
    return None


@pytest.mark.skipif(installed_debian_split() is None and os.environ.get("CI") != "true",
                    reason="no Debian split headers installed (scripts/setup.sh installs them)")
def test_real_installed_debian_headers_are_used_for_their_kernel():
    modules = installed_debian_split()
    assert modules, "CI: scripts/setup.sh installs linux-headers-amd64"
    release = os.path.basename(modules)
    choice = kh.choose_headers(release=release, environ={})
    assert choice.kind == "running", choice.describe()
    assert release in choice.describe()
