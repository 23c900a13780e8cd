# Minimal stand-in for a Slicer build tree, used by Testing/test_slicer_static.py to configure the extension with
# plain CMake (no Slicer build needed). It defines what the extension's CMake files use, with the same signatures
# as Slicer's (CMake/SlicerMacroBuildScriptedModule.cmake, CMake/SlicerMacroPythonTesting.cmake), and it fails
# where Slicer's build would: a listed script or resource that does not exist. What the extension declared is
# written to ${CMAKE_BINARY_DIR}/slicer-stand-in.txt for the test to compare with the files on disk.

set(Slicer_FOUND TRUE)
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionGenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionCPack.cmake")
set(SLICER_STAND_IN_RECORD "${CMAKE_BINARY_DIR}/slicer-stand-in.txt")
file(WRITE "${SLICER_STAND_IN_RECORD}" "")
