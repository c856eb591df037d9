/**
 * Thrown for input the user can fix (a flag, a file, a bind address); the command line prints
 * the message and a pointer to `--help` instead of a stack trace, and exits with status 2.
 * It lives below every layer so library functions that check options can throw it too.
 */
export class UsageError extends Error {}
