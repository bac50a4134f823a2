"""Named recipes: ``recipe: demo | paper`` in a method's YAML section selects a preset of its fields.

A method's config subclasses :class:`RecipeConfig` and lists its presets in ``RECIPES``. The class
defaults are the ``demo`` recipe (small, for the bundled digits on a CPU); ``paper`` carries the
official recipe, with learning rates given per ``train.lr_batch`` images so they scale linearly to
the batch actually used. Whatever the YAML sets overrides the preset field by field, also inside
nested sections (``train: {epochs: 3}`` keeps the preset's, or the method's default, optimizer and lr)::

    methods:
      stitching: {recipe: paper, train: {epochs: 3}}

A preset may have variants that depend on what the method only learns at fit time (SN-Net's DeiT
recipe differs from its ResNet one): ``RECIPES["paper:cnn"]`` is merged over ``RECIPES["paper"]``
by :meth:`RecipeConfig.variant`, and the YAML still wins over both.
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

from pydantic import PrivateAttr, model_validator
from typing_extensions import Self

from podium.methods.base import StrictModel

RecipeName = Literal["demo", "paper"]


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, recursively for mappings (lists and values are replaced whole)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class RecipeConfig(StrictModel):
    """A method config with named presets (see the module docstring)."""

    RECIPES: ClassVar[dict[str, dict[str, Any]]] = {}
    recipe: RecipeName = "demo"
    _given: dict[str, Any] = PrivateAttr(default_factory=dict)  # the fields the user set, before the preset

    @model_validator(mode="wrap")
    @classmethod
    def _apply_recipe(cls, raw: Any, handler: Any) -> Self:
        if not isinstance(raw, dict):
            return handler(raw)
        recipe = raw.get("recipe", "demo")
        preset = cls.RECIPES.get(recipe, {}) if isinstance(recipe, str) else {}
        model = handler(merge(merge(cls._nested_defaults(), preset), raw))
        model._given = copy.deepcopy(raw)
        return model

    @classmethod
    def _nested_defaults(cls) -> dict[str, Any]:
        """The defaults of nested sections as mappings, so that ``train: {epochs: 1}`` changes only the
        epochs of the method's own default training, not every other field back to TrainConfig's."""
        return {name: f.default.model_dump() for name, f in cls.model_fields.items()
                if isinstance(f.default, StrictModel)}

    def variant(self, name: str) -> Self:
        """This config with the ``<recipe>:<name>`` preset merged under the user's own fields
        (itself when the recipe has no such variant)."""
        extra = self.RECIPES.get(f"{self.recipe}:{name}")
        if extra is None:
            return self
        base = merge(self.RECIPES.get(self.recipe, {}), extra)
        model = type(self).model_validate(merge(base, {**self._given, "recipe": self.recipe}))
        model._given = self.given()
        return model

    def given(self) -> dict[str, Any]:
        """What the YAML set for this method (the preset excluded)."""
        return copy.deepcopy(self._given)
