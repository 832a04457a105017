from closewait_trace.entry import main

main()
