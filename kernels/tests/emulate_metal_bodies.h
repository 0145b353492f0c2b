// emulate_metal_bodies.h: include after the shared headers and before the .metal bodies.
//
// In the shared headers `threadgroup` is an address space (empty on the host). Inside a kernel body a
// `threadgroup` array is one array per threadgroup: here a function-local static, shared by the host threads
// that run the group (run_threadgroups runs groups one at a time). The headers were read with the first
// meaning; from here on the bodies get the second.
#undef threadgroup
#define threadgroup static
