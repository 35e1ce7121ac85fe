# trainer/data.cmake — the torch-free part of the trainer: library msa_data (byte tokens, corpus,
# training mix, retrieval cases, PNG writer, heat-maps and curves) and its tests data_* / viz_*.
# Included by the trainer's CMakeLists (or the top level); paths are relative to this file.

add_library(msa_data STATIC
  ${CMAKE_CURRENT_LIST_DIR}/data.cpp
  ${CMAKE_CURRENT_LIST_DIR}/png.cpp
  ${CMAKE_CURRENT_LIST_DIR}/viz.cpp)
set_target_properties(msa_data PROPERTIES POSITION_INDEPENDENT_CODE ON)
target_include_directories(msa_data PUBLIC ${CMAKE_CURRENT_LIST_DIR})
target_compile_options(msa_data PRIVATE -Wall -Wextra)
# msa::Error (include/msa/common.h) is the error type; nothing else of the core is used.
find_package(nlohmann_json 3 REQUIRED)
target_link_libraries(msa_data PUBLIC msa::msa PRIVATE nlohmann_json::nlohmann_json)

if(MSA_BUILD_TESTS)
  enable_testing()
  find_package(GTest REQUIRED)
  include(GoogleTest)
  foreach(t data viz)
    add_executable(test_${t} ${CMAKE_CURRENT_LIST_DIR}/tests/test_${t}.cpp)
    target_compile_options(test_${t} PRIVATE -Wall -Wextra)
    target_link_libraries(test_${t} PRIVATE msa_data GTest::gtest_main)
    gtest_discover_tests(test_${t} TEST_PREFIX "${t}_" DISCOVERY_TIMEOUT 60)
  endforeach()
endif()
