"""The installed model bundles: registry, lookup, description for the panel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from slicer.i18n import tr as _

from AttentionUNetSlicer.definitions import AttentionUNetSegmentError

if TYPE_CHECKING:  # annotations only: the engine's bundle module loads on first use
    from AttentionUNetSegmentLib.model.bundle import ModelBundle, ModelRegistry


class ModelCatalog:
    """Logic part: the installed models (metadata only; nothing heavy is imported)."""

    def modelRegistry(self) -> ModelRegistry:
        from AttentionUNetSegmentLib.model.bundle import ModelRegistry

        return ModelRegistry(self.modelSearchPath)

    def availableModels(self):
        """``(bundles, problems)`` of the installed models (metadata only; nothing heavy is imported)."""
        return self.modelRegistry().scan()

    def resolveModel(self, model: Optional[str]) -> ModelBundle:
        """The bundle for an installed model name or a bundle folder (metadata validated, weights not read)."""
        from AttentionUNetSegmentLib.errors import ModelBundleError

        try:
            return self.modelRegistry().find(model or None)
        except ModelBundleError as error:
            raise AttentionUNetSegmentError(str(error))

    @staticmethod
    def describeModel(bundle: ModelBundle) -> str:
        """Rich text for the panel: description, segments with their colours, licence."""
        meta = bundle.metadata
        swatches = ", ".join(
            "<span style='color:#{:02x}{:02x}{:02x}'>&#9632;</span> {}".format(
                *(int(round(255 * c)) for c in label.color), label.name) for label in bundle.labels)
        lines = [f"<b>{bundle.name}</b> {bundle.version}: {meta.get('description', '')}",
                 _("Segments: {segments}").format(segments=swatches),
                 _("Licence: {license}").format(license=meta.get("license", _("not stated")))]
        if meta.get("training_data"):
            lines.append(_("Trained on: {data}").format(data=meta["training_data"]))
        if bundle.fold_count > 1:
            crossValidation = (meta.get("metrics") or {}).get("cross_validation") or {}
            meanDice = (crossValidation.get("mean") or {}).get("mean_dice")
            if isinstance(meanDice, float):
                lines.append(_("Fold ensemble of {count} networks (their probabilities are averaged); "
                               "cross-validation mean Dice {dice}").format(count=bundle.fold_count,
                                                                            dice=f"{meanDice:.3f}"))
            else:
                lines.append(_("Fold ensemble of {count} networks (their probabilities are averaged)").format(
                    count=bundle.fold_count))
        return "<br>".join(lines)

    @staticmethod
    def hasLocalizer(bundle: ModelBundle) -> bool:
        """Whether the model can locate its structure in a larger volume (a ``localization`` section)."""
        return isinstance(bundle.metadata.get("localization"), dict)
