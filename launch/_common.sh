# Shared by the launch scripts (sourced): errors, shell quoting, dry-run.
# The sourcing script sets PROG.

die() {
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

# Quote one word for a POSIX shell; words made of safe characters are left as they are, and
# in `--option=value` only the value is quoted.
q() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=,+@%^-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9][A-Za-z0-9._-]*=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    q "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quote every argument and join them with spaces.
qjoin() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(q "$a")"
  done
  printf '%s' "$out"
}

DRY_RUN=${DRY_RUN:-0}
is_dry() { [[ $DRY_RUN == 1 || $DRY_RUN == true || $DRY_RUN == yes ]]; }

# Print a command as `+ WORDS` (stdout in dry-run, stderr otherwise) and run it unless dry-run.
run() {
  if is_dry; then
    printf '+ %s\n' "$(qjoin "$@")"
  else
    printf '+ %s\n' "$(qjoin "$@")" >&2
    "$@"
  fi
}

# Value of an option given as `--opt=value` or `--opt value`; sets SHIFT to the words used.
optval() {
  local opt=$1 arg=$2
  if [[ $arg == *=* ]]; then
    VALUE=${arg#*=}
    SHIFT=1
  else
    [[ $# -ge 3 ]] || die "$opt needs a value"
    VALUE=$3
    SHIFT=2
  fi
}
