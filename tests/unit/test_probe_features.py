"""Which kernel facilities the probe uses, and the testing knob that forces
the older kernels' fallbacks (pure: no bcc, no root)."""

import pytest

from closewait_trace.kernel import probe
from closewait_trace.errors import EXIT_USAGE, UserError


@pytest.mark.parametrize("release,ringbuf,boot", [
    ("6.18.44-fc", True, True), ("5.8.0-1", True, True), ("5.7.19", False, False),
    ("5.4.0-216-generic", False, False), ("4.18.0-553.el8_10.x86_64", False, False),
    ("garbage", False, False),
])
def test_features_follow_the_kernel_release(release, ringbuf, boot):
    f = probe.detect_features(release=release, environ={})
    assert (f.ringbuf, f.boot_clock, f.batch_read, f.forced) == (ringbuf, boot, True, ())


def test_force_gives_a_new_kernel_the_5_4_path():
    f = probe.detect_features(release="6.18.0",
                              environ={probe.FORCE_ENV: "perfbuf, monotonic,PERKEY"})
    assert (f.ringbuf, f.boot_clock, f.batch_read) == (False, False, False)
    assert f.transport == "perf buffer" and f.clock == "monotonic"
    assert f.describe() == ("perf buffer, monotonic clock, per-key map reads "
                            "(forced by CLOSEWAIT_TRACE_FORCE=perfbuf,monotonic,perkey)")


def test_force_one_feature_leaves_the_others_to_the_kernel():
    f = probe.detect_features(release="6.18.0", environ={probe.FORCE_ENV: "perfbuf"})
    assert (f.ringbuf, f.boot_clock, f.batch_read) == (False, True, True)


def test_unknown_force_word_is_a_usage_error():
    with pytest.raises(UserError) as exc:
        probe.detect_features(release="6.18.0", environ={probe.FORCE_ENV: "perfbuff"})
    assert exc.value.exit_code == EXIT_USAGE
    assert "'perfbuff'" in exc.value.one_line() and "perfbuf" in exc.value.hint


def test_cflags_follow_the_features():
    config = probe.ProbeConfig(threshold_ns=1, features=probe.detect_features(
        release="5.4.0", environ={}))
    flags = config.cflags(config.features.ringbuf, config.features.boot_clock)
    assert "-DUSE_RINGBUF" not in flags and "-DUSE_BOOT_CLOCK" not in flags
