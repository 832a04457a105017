from closewait_trace.cli import main

main()
