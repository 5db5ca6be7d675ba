import diffusers

import diffusers_speedup as ds


def test_reexports_diffusers_base_classes():
    assert ds.ModelMixin is diffusers.ModelMixin
    assert ds.SchedulerMixin is diffusers.SchedulerMixin


def test_pipelines_package_is_installed_under_the_library():
    import diffusers_speedup.pipelines  # noqa: F401
