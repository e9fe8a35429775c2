"""Shared pytest configuration."""


def pytest_configure(config):
    # `slow`: runs of a few CPU minutes (e.g. the fine-tuning acceptance test); they run in the default
    # `pytest tests` invocation, `-m "not slow"` leaves them out
    config.addinivalue_line("markers", "slow: a test that takes CPU minutes (still part of the default run)")
    # markers of transformers' own common tests (tests/test_transformers_common.py runs them)
    for name in ("flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test", "accelerate_tests"):
        config.addinivalue_line("markers", f"{name}: a marker of transformers' common tests")
