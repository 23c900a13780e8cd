"""Installing what the engine needs on first use: torch through the PyTorch extension, the rest with pip."""

from __future__ import annotations

import pathlib
from typing import Callable, List, Optional

import slicer
from slicer.i18n import tr as _

from AttentionUNetSlicer.definitions import (
    DICOM_REQUIREMENTS_FILE,
    REPORT_REQUIREMENTS_FILE,
    REQUIREMENTS_FILE,
    TORCH_REQUIREMENT,
    AttentionUNetSegmentError,
)


class DependencyInstaller:
    """Logic part: ``ensureDependencies`` and the requirement checks behind it."""

    def ensureDependencies(self, statusCallback: Optional[Callable[[str], None]] = None) -> None:
        """Install what the engine needs, only when first needed and after asking: torch through the PyTorch
        extension, the rest with ``slicer.packaging.pip_ensure`` (Slicer 5.12+) or ``slicer.util.pip_install``
        (older).
        ``statusCallback(text)`` is told what is being installed before each installation starts (the panel shows
        it: an installation blocks for minutes)."""
        self._ensureTorch(statusCallback)
        self._ensureRequirements(REQUIREMENTS_FILE, _("The segmentation"), statusCallback)

    def ensureReportDependencies(self, statusCallback: Optional[Callable[[str], None]] = None) -> None:
        """What Export > Report (PDF) needs besides the engine's requirements (``ensureDependencies``)."""
        self._ensureRequirements(REPORT_REQUIREMENTS_FILE, _("The PDF report"), statusCallback)

    def ensureDicomSegDependencies(self, statusCallback: Optional[Callable[[str], None]] = None) -> None:
        """What Export > DICOM SEG needs (highdicom, pydicom)."""
        self._ensureRequirements(DICOM_REQUIREMENTS_FILE, _("The DICOM SEG export"), statusCallback)

    def _ensureRequirements(self, requirementsFile: pathlib.Path, purpose: str,
                            statusCallback: Optional[Callable[[str], None]] = None) -> None:
        """Install the missing packages of ``requirementsFile`` (asking first); ``purpose`` (translated) names what
        needs them in messages."""
        requirements = _readRequirements(requirementsFile)
        missing = [req for req in requirements if not _requirementSatisfied(req)]
        if not missing:
            return
        # Asked here on every release (pip_ensure's own question would come after the status line said
        # "Installing"): the status line then says what is being installed while the installation blocks.
        if not slicer.util.confirmOkCancelDisplay(
                _("Attention U-Net needs these Python packages, which will be downloaded and installed now:\n"
                  "{packages}").format(packages="\n".join(missing)), windowTitle=_("Install Python packages")):
            raise AttentionUNetSegmentError(
                _("{purpose} needs these Python packages: {packages}. Click again and accept the "
                  "installation.").format(purpose=purpose, packages=", ".join(missing)))
        _installStatus(statusCallback, ", ".join(missing))()
        try:
            import slicer.packaging as packaging
        except ImportError:  # Slicer 5.8/5.10
            packaging = None
        try:
            if packaging is not None:
                # Requirement objects from Slicer's own loader: every pip_ensure release accepts them.
                packaging.pip_ensure(packaging.load_requirements(str(requirementsFile)), prompt_install=False,
                                     requester="AttentionUNet")
            else:
                slicer.util.pip_install(missing)
        except Exception as error:
            raise AttentionUNetSegmentError(
                _("Installing {packages} failed ({error}). Check the internet connection; behind a firewall or "
                  "proxy see the README section 'Troubleshooting'. Restart 3D Slicer if it asks to.").format(
                      packages=", ".join(missing), error=error))

    def _ensureTorch(self, statusCallback: Optional[Callable[[str], None]] = None) -> None:
        if moduleAvailable("torch"):
            import importlib.metadata

            try:
                version = importlib.metadata.version("torch")
            except importlib.metadata.PackageNotFoundError:  # a build without package metadata: cannot tell
                return
            if not _requirementSatisfied("torch" + TORCH_REQUIREMENT):
                raise AttentionUNetSegmentError(
                    _("PyTorch {version} is too old: the segmentation needs torch{requirement}. Update it in the "
                      "PyTorch Utils module (uninstall, then install), restart 3D Slicer, then click Apply "
                      "again.").format(version=version, requirement=TORCH_REQUIREMENT))
            return
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise AttentionUNetSegmentError(
                _("PyTorch is missing. Install the 'PyTorch' extension from the Extensions Manager, restart "
                  "3D Slicer, then click Apply again."))
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("Attention U-Net needs PyTorch. It will be downloaded and installed now (this can take several "
                  "minutes and about 2 GB of disk space)."), windowTitle=_("Install PyTorch")):
            raise AttentionUNetSegmentError(_("The segmentation needs PyTorch. Click Apply again and accept the "
                                              "installation, or install it from the PyTorch Utils module."))
        _installStatus(statusCallback, "PyTorch")()
        if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
            raise AttentionUNetSegmentError(_("PyTorch could not be installed. Install it from the PyTorch Utils "
                                              "module (it shows the reason), then restart 3D Slicer."))


def _installStatus(statusCallback: Optional[Callable[[str], None]], what: str) -> Callable[[], None]:
    """What tells the panel that ``what`` is being installed now (nothing without a callback)."""
    def status() -> None:
        if statusCallback is not None:
            statusCallback(_("Installing {packages}; this can take several minutes...").format(packages=what))
    return status


def _readRequirements(path: pathlib.Path) -> List[str]:
    if not path.is_file():
        return []
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def _requirementSatisfied(requirement: str) -> bool:
    """Whether an installed distribution satisfies ``requirement`` (name and, where ``packaging`` is available,
    its version specifier)."""
    import importlib.metadata
    import re

    try:
        from packaging.requirements import Requirement
    except ImportError:  # only the name can be checked
        Requirement = None
    parsed = Requirement(requirement) if Requirement is not None else None
    name = parsed.name if parsed is not None else re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return parsed is None or parsed.specifier.contains(version, prereleases=True)


def moduleAvailable(name: str) -> bool:
    """Whether ``name`` can be imported (``find_spec``; a module set to ``None`` in ``sys.modules`` cannot)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
