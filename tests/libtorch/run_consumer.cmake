# ctest driver: install fastmoe into a scratch prefix, build tests/libtorch/consumer against it with
# find_package(fastmoe), and run it. Arguments: BUILD_DIR, SOURCE_DIR, PREFIX_PATH (torch's), GENERATOR.
set(install_dir ${BUILD_DIR}/consumer-install)
set(consumer_build ${BUILD_DIR}/consumer-build)

# A macro, not a function: the quoted prefix list must reach execute_process without being split at ';'.
macro(check_step name)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "consumer test: ${name} failed (${result})")
  endif()
endmacro()

execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${install_dir} OUTPUT_QUIET
                RESULT_VARIABLE result)
check_step("cmake --install")
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/libtorch/consumer -B ${consumer_build}
                        -G ${GENERATOR} -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=${install_dir};${PREFIX_PATH}"
                OUTPUT_QUIET RESULT_VARIABLE result)
check_step("configuring the consumer with find_package(fastmoe)")
execute_process(COMMAND ${CMAKE_COMMAND} --build ${consumer_build} RESULT_VARIABLE result)
check_step("building the consumer")
execute_process(COMMAND ${consumer_build}/consumer RESULT_VARIABLE result)
check_step("running the consumer")
