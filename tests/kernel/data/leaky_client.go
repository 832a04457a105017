// A Go client that leaks its connection: fetchUser dials and hands the
// connection out; nobody reads or closes it (kept in a global, so that the
// garbage collector's finalizer does not close it either).
package main

import (
	"fmt"
	"net"
	"os"
)

var pool []net.Conn

//go:noinline
func fetchUser(addr string) net.Conn {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		os.Exit(1)
	}
	return c
}

func main() {
	pool = append(pool, fetchUser("127.0.0.1:"+os.Args[1]))
	fmt.Println("connected")
	select {}
}
