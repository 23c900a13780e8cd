# Stand-in for Slicer's SlicerExtensionCPack.cmake: it must come after the extension configuration.
file(APPEND "${SLICER_STAND_IN_RECORD}" "CPACK|${PROJECT_NAME}\n")
