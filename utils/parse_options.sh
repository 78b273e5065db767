#!/usr/bin/env bash
# Kaldi-style option parsing, sourced after a script has set its default variables:
#   --foo-bar VALUE or --foo_bar=VALUE sets the existing variable foo_bar; an unknown option is fatal.
#   --help / -h prints $help_message (if set) and the options with their current values ($options,
#   a space-separated list of the variable names, is required).
# Parsing stops at the first argument that is not an option (or after --); the rest stay in "$@".
# Usage:
#   options="stage stop_stage nj"; stage=1; stop_stage=8; nj=2
#   . utils/parse_options.sh
__usage() {
  echo "${help_message:-Usage: $0 [options]}"
  echo "Options (current value):"
  for __o in $options; do printf '  --%s (%s)\n' "$__o" "${!__o}"; done
}
# shellcheck disable=SC2086
__opts=" $(printf '%s ' $options)"   # the names, whatever whitespace separates them
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) __usage; exit 0 ;;
    --) shift; break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --*)
      __name=${1#--}; __name=${__name//-/_}
      if [[ "$__opts" != *" $__name "* ]]; then
        echo "$0: unknown option $1 (see --help)" >&2; exit 1
      fi
      if [ $# -lt 2 ]; then echo "$0: option $1 needs a value" >&2; exit 1; fi
      printf -v "$__name" '%s' "$2"; shift 2 ;;
    *) break ;;
  esac
done
unset __name __o __opts
