"""The batch summary table: one row per volume with the columns of the engine's ``summary.csv``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Sequence

import slicer

if TYPE_CHECKING:  # annotations only: nothing of sceneImport is needed at run time
    from AttentionUNetSlicer.sceneImport import SegmentationResult


class BatchSummary:
    """Logic part: summary rows and the table node."""

    @staticmethod
    def summaryReport(result: SegmentationResult) -> Dict[str, Any]:
        """A result as the engine's summary reads a ``_report.json``: segments, per-side totals, warnings."""
        return {"segments": result.statistics, "sides": result.sides, "asymmetry_index": result.asymmetryIndex,
                "warnings": list(result.warnings)}

    @staticmethod
    def summaryRow(volume, status: str, model: Sequence[str], message: str = "") -> Dict[str, str]:
        """The row of a volume that was not segmented (``model``: name and version)."""
        from AttentionUNetSegmentLib.inference.outputs import summary_row

        return summary_row(volume.GetName(), status, model[0], model[1], error=message)

    def resultSummaryRow(self, result: SegmentationResult) -> Dict[str, str]:
        """A segmented volume's row: every segment's mL, per-side totals and the asymmetry index for a located
        run, its warnings (the engine's ``summary_row``, as in ``summary.csv``)."""
        from AttentionUNetSegmentLib.inference.outputs import summary_row

        return summary_row(result.inputVolume.GetName(), "done", result.provenance.get("Model", ""),
                           result.provenance.get("ModelVersion", ""), self.summaryReport(result))

    def createSummaryTable(self, rows: Sequence[Dict[str, str]], results: Sequence[SegmentationResult]):
        """A table node with the columns of the engine's ``summary.csv`` for these results (``summary_columns``),
        one row per volume."""
        from AttentionUNetSegmentLib.inference.outputs import summary_columns

        columns = summary_columns([self.summaryReport(result) for result in results])
        table = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName("AttentionUNet batch summary"))
        for name in columns:
            table.AddColumn().SetName(name)
        for row in rows:
            index = table.AddEmptyRow()
            for column, name in enumerate(columns):
                table.SetCellText(index, column, str(row.get(name, "")))
        return table

    @staticmethod
    def showTable(tableNode) -> None:
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(tableNode.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
