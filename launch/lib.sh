# Helpers shared by the launch scripts; sourced, not run.

# Prints its arguments as one shell-quoted line (the quoting of Python's shlex.join).
quote_line() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\"\'\"\'}'")
    fi
  done
  echo "${out[*]}"
}
