/* malloc, calloc and realloc straight from glibc, preloaded ahead of libfiu's POSIX wrappers.

   libfiu's libc/mm wrappers keep a thread-local recursion guard. When a library with thread-local storage is
   dlopen'ed after start-up (torch, tokenizers, triton do), the first access to that guard grows the TLS vector,
   which calls realloc, which is the wrapper again: glibc aborts with "double free". Allocations are not what the
   I/O-fault tests inject into, so they bypass the wrappers; the posix/io failure points stay in place. */
#include <stddef.h>

extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *ptr, size_t size);

void *malloc(size_t size) { return __libc_malloc(size); }
void *calloc(size_t count, size_t size) { return __libc_calloc(count, size); }
void *realloc(void *ptr, size_t size) { return __libc_realloc(ptr, size); }
