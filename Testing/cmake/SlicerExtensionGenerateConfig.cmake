# Stand-in for Slicer's SlicerExtensionGenerateConfig.cmake: the extension must describe itself fully.
foreach(var EXTENSION_HOMEPAGE EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION EXTENSION_ICONURL
    EXTENSION_SCREENSHOTURLS EXTENSION_DEPENDS)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "" OR "${${var}}" STREQUAL "NA")
    message(FATAL_ERROR "${var} is not filled in")
  endif()
  file(APPEND "${SLICER_STAND_IN_RECORD}" "${var}|${${var}}\n")
endforeach()
file(APPEND "${SLICER_STAND_IN_RECORD}" "EXTENSION_NAME|${PROJECT_NAME}\n")
if(DEFINED EXTENSION_CATEGORY)
  file(APPEND "${SLICER_STAND_IN_RECORD}" "EXTENSION_CATEGORY|${EXTENSION_CATEGORY}\n")
endif()
