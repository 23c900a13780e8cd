"""Scene bookkeeping shared by import and export: node ids of a class, removing nodes with their display
nodes."""

from __future__ import annotations

import slicer


def nodeIds(scene, className: str) -> set:
    return {node.GetID() for node in slicer.util.getNodesByClass(className, scene)}


def removeNodes(nodes) -> None:
    """Remove nodes from the scene together with their display nodes (which the scene would otherwise keep)."""
    for node in nodes:
        scene = node.GetScene()
        if scene is None:
            continue
        displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
            if node.IsA("vtkMRMLDisplayableNode") else []
        for display in displays:
            if display is not None:
                scene.RemoveNode(display)
        scene.RemoveNode(node)
