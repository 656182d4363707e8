"""The ``atoken_*`` hooks through which plugins provide components and commands.

Each component hook takes no arguments and returns a list of :class:`~atoken_core.registry.Component`
describing what the plugin provides. Results are *collected*, one list per plugin, never
short-circuited: the plugin manager calls every implementation and registers each
component under its name in the registry of that kind, so two plugins claiming one name
is an error that names both.

Plugin modules must stay cheap to import (they are loaded eagerly from entry points):
a component's factory is given as a ``"module:attribute"`` string and imported only when
a recipe builds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from atoken_core import hookspec

if TYPE_CHECKING:
    import argparse

    from atoken_core.registry import Component


@hookspec
def atoken_modalities() -> list[Component]:
    """Return the modalities this plugin provides.

    The factory is called as ``factory(config)`` with the recipe's ``[modality.NAME]`` table
    structured into the component's config class (its defaults when the recipe has none), and
    returns an :class:`atoken_core.interfaces.Modality` whose ``name`` is the component's. The
    modality turns samples into sparse 4D tokens and back, and declares everything else the core
    does with its samples (files, channels, previews, evaluation data and metrics).
    """


@hookspec
def atoken_bottlenecks() -> list[Component]:
    """Return the bottlenecks (continuous or discrete) this plugin provides.

    The factory is called as ``factory(config, in_dim=..., latent_dim=...)`` and returns an
    :class:`atoken_core.interfaces.Bottleneck`.
    """


@hookspec
def atoken_losses() -> list[Component]:
    """Return the losses this plugin provides.

    The factory is called as ``factory(config)`` and returns an
    :class:`atoken_core.interfaces.Loss` producing named terms.
    """


@hookspec
def atoken_curricula() -> list[Component]:
    """Return the curricula this plugin provides.

    The factory is called as ``factory(config)`` and returns an
    :class:`atoken_core.interfaces.Curriculum` that orders the recipe's stages.
    """


@hookspec
def atoken_data() -> list[Component]:
    """Return the data sources this plugin provides.

    The factory is called as ``factory(config)`` with the recipe's ``[data.NAME]`` table (minus
    ``kind``) structured into the component's config class, or as ``factory(config,
    modality=...)`` with the :class:`~atoken_core.interfaces.Modality` it feeds when it takes a
    ``modality`` argument (as pluggy passes an implementation only what it names), and returns an
    :class:`atoken_core.interfaces.DataSource` of training and evaluation samples for the
    modality ``NAME``. Its config declares ``train_sample_shape()``
    (:class:`atoken_core.interfaces.SampleShape`) so ``--dry-run`` can count tokens.
    """


@hookspec
def atoken_teachers() -> list[Component]:
    """Return the frozen image-text teachers (e.g. SigLIP2) this plugin provides.

    The factory is called as ``factory(config)`` and returns an
    :class:`atoken_core.interfaces.Teacher`; semantic losses name one by ``teacher = "NAME"``
    or ``"NAME:PATH"``.
    """


@hookspec
def atoken_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add subcommands to the ``atoken`` command line (as pytest's ``pytest_addoption`` adds
    options): call ``subparsers.add_parser(...)`` and ``set_defaults(func=...)`` with a callable
    taking the parsed arguments and returning the exit status. Every implementation is called.

    Building the parser must stay cheap (no torch); the work happens in ``func``. An error a
    user can fix is raised as a subclass of :class:`atoken_core.errors.UserError` and printed
    as one line without a traceback.
    """
