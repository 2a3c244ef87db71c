# Generates a C file holding every sql/NNN_name.sql migration, so that
# paymentctl migrate needs no file beside the binary.
# Inputs: SQL_DIR, OUT.
file(GLOB files "${SQL_DIR}/[0-9][0-9][0-9]_*.sql")
list(SORT files)
set(body "/* Generated from sql/ by cmake/embed_sql.cmake; do not edit. */\n#include \"migrations.h\"\n\n")
set(table "")
set(n 0)
foreach(f ${files})
  get_filename_component(name ${f} NAME_WE)
  string(SUBSTRING ${name} 0 3 num)
  string(REGEX REPLACE "^0+([0-9])" "\\1" num "${num}") # 010 must not read as octal in C
  file(READ ${f} hex HEX)
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," hex "${hex}")
  string(APPEND body "static const char sql_${n}[] = {${hex} 0};\n")
  string(APPEND table "    {${num}, \"${name}\", sql_${n}},\n")
  math(EXPR n "${n} + 1")
endforeach()
string(APPEND body "\nconst struct migration migrations[] = {\n${table}};\nconst int migrations_count = ${n};\n")
file(WRITE ${OUT}.tmp "${body}")
execute_process(COMMAND ${CMAKE_COMMAND} -E copy_if_different ${OUT}.tmp ${OUT})
