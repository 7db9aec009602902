// gemmakit's kernels as one translation unit: ATen's headers, most of a build's time, are parsed
// once, so that a first run builds them on one core while its checkpoint converts on the other
// (kernels/__init__.py).
#include "int8_matmul.cpp"
#include "softmax_rows.cpp"
#include "geglu.cpp"
