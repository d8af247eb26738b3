# Installs fastmoe_torch, the public headers and fastmoeConfig.cmake so that libtorch users can write
# find_package(fastmoe) and link fastmoe::fastmoe_torch.
include(CMakePackageConfigHelpers)

install(TARGETS fastmoe_torch EXPORT fastmoeTargets
        LIBRARY DESTINATION ${FASTMOE_LIB_DIR}
        RUNTIME DESTINATION ${FASTMOE_LIB_DIR})
install(DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/include/fastmoe DESTINATION ${FASTMOE_INCLUDE_DIR})
install(EXPORT fastmoeTargets NAMESPACE fastmoe:: DESTINATION ${FASTMOE_CMAKE_DIR})
configure_package_config_file(${CMAKE_CURRENT_SOURCE_DIR}/cmake/fastmoeConfig.cmake.in
                              ${CMAKE_CURRENT_BINARY_DIR}/fastmoeConfig.cmake
                              INSTALL_DESTINATION ${FASTMOE_CMAKE_DIR})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/fastmoeConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/fastmoeConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/fastmoeConfigVersion.cmake
        DESTINATION ${FASTMOE_CMAKE_DIR})
if(FASTMOE_BUILD_PYTHON AND SKBUILD)
  install(TARGETS _C LIBRARY DESTINATION fastmoe)
endif()
