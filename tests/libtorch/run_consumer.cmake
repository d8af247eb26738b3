# ctest driver: install fastmoe into a scratch prefix, build a program against it with find_package(fastmoe), and
# run it. Arguments: BUILD_DIR, SOURCE_DIR, PREFIX_PATH (torch's), GENERATOR; optional NAME (default consumer),
# PROJECT (its source folder, default tests/libtorch/consumer) and ARGS (a ';'-free, space-separated argument
# string for the program). Each NAME gets its own prefix and build folder, so two of these tests can run at once.
if(NOT NAME)
  set(NAME consumer)
endif()
if(NOT PROJECT)
  set(PROJECT ${SOURCE_DIR}/tests/libtorch/consumer)
endif()
set(install_dir ${BUILD_DIR}/${NAME}-install)
set(consumer_build ${BUILD_DIR}/${NAME}-build)
separate_arguments(run_args UNIX_COMMAND "${ARGS}")

# A macro, not a function: the quoted prefix list must reach execute_process without being split at ';'.
macro(check_step name)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "${NAME} test: ${name} failed (${result})")
  endif()
endmacro()

execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${install_dir} OUTPUT_QUIET
                RESULT_VARIABLE result)
check_step("cmake --install")
execute_process(COMMAND ${CMAKE_COMMAND} -S ${PROJECT} -B ${consumer_build}
                        -G ${GENERATOR} -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=${install_dir};${PREFIX_PATH}"
                OUTPUT_QUIET RESULT_VARIABLE result)
check_step("configuring ${PROJECT} with find_package(fastmoe)")
execute_process(COMMAND ${CMAKE_COMMAND} --build ${consumer_build} RESULT_VARIABLE result)
check_step("building ${NAME}")
execute_process(COMMAND ${consumer_build}/${NAME} ${run_args} RESULT_VARIABLE result)
check_step("running ${NAME}")
